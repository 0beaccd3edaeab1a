"""Fault injection for tests/recipes/test_rank_faults.py, never shipped: that test puts this
directory on PYTHONPATH, so every Python process it starts imports this at startup. A worker
then fails the way the test asks when the test signals it by pid:

- SIGUSR1: raise an exception from whatever the rank is running (mid-step, in the main thread)
- SIGUSR2: stall: sleep inside the step for an hour

(SIGKILL needs nothing here.)"""

import signal
import time


def _raise(signum, frame):
    raise RuntimeError("injected fault: this rank raised")


def _stall(signum, frame):
    time.sleep(3600)


signal.signal(signal.SIGUSR1, _raise)
signal.signal(signal.SIGUSR2, _stall)
