"""When a rank dies: which one, and what to tell the user, in one line.

Detection itself is torch's: a rank that is killed closes its sockets, so its peers' next
collective fails at once; a rank that stalls makes its peers' collective time out after
`distributed.timeout_s` (the process group's timeout); either way torchrun's elastic agent (run by
`accelerate launch`) sees a worker exit, stops the others (SIGTERM, then SIGKILL after its
shutdown timeout) and prints a table of the failures it saw. This module only reads that table
and the exit status workers give themselves (`LOST_CONTACT_EXIT`), to name the rank that failed
first rather than the ranks that merely lost it.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

# A worker whose collective failed because another rank died or stalled exits with this status
# (EX_TEMPFAIL), so that the launcher can tell the victims from the rank that failed.
LOST_CONTACT_EXIT = 75

# torch.distributed.elastic's ChildFailedError table, one block per failed rank.
# The agent's log line when it stops a worker that was still running.
_STOPPING_RE = re.compile(r"Sending process (\d+) closing signal")
_FAILURE_RE = re.compile(
    r"rank\s*:\s*(?P<rank>\d+) \(local_rank: (?P<local>\d+)\)\s*\n"
    r"\s*exitcode\s*:\s*(?P<code>-?\d+) \(pid: (?P<pid>\d+)\)"
)


@dataclass(frozen=True)
class RankFailure:
    rank: int
    exitcode: int
    pid: int

    @property
    def lost_contact(self) -> bool:
        return self.exitcode == LOST_CONTACT_EXIT

    def how(self) -> str:
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"was killed by {name}"
        return f"failed with exit code {self.exitcode} (its traceback is above)"


def stopped_pids(launcher_output: str) -> set[int]:
    """Workers the agent stopped because another failed: they were alive at that moment."""
    return {int(pid) for pid in _STOPPING_RE.findall(launcher_output)}


def parse_failures(launcher_output: str) -> list[RankFailure]:
    """The failed ranks in the elastic agent's report, each once, in the order it lists them."""
    seen: dict[int, RankFailure] = {}
    for match in _FAILURE_RE.finditer(launcher_output):
        rank = int(match["rank"])
        seen.setdefault(rank, RankFailure(rank, int(match["code"]), int(match["pid"])))
    return list(seen.values())


def is_lost_contact(exc: BaseException) -> bool:
    """A collective or the rendezvous store failed: another rank is gone or stalled."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    # gloo reports a dead peer or a timeout as a plain RuntimeError from its transport
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        sign in text
        for sign in ("gloo", "Connection closed by peer", "Timed out", "Application timeout")
    )


def lost_contact_line(rank: int, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"still: rank {rank} lost contact with the other ranks: {first}"


def describe(
    failures: list[RankFailure], stopped: set[int], world_size: int, timeout_s: int
) -> str | None:
    """One sentence naming the rank that failed first; None when the report named no rank.

    The first rank to fail is one that neither lost contact nor was stopped by the agent (it
    died, or raised). Failing that, ranks that lost contact while another was still running
    (the agent had to stop it) waited timeout_s for that one: it stalled.
    """
    if not failures:
        return None
    culprits = [f for f in failures if not f.lost_contact and f.pid not in stopped]
    if culprits:
        first = culprits[0]
        return f"rank {first.rank} (pid {first.pid}) {first.how()}; the other ranks were stopped"
    victims = sorted(f.rank for f in failures if f.pid not in stopped)
    stalled = sorted(f.rank for f in failures if f.pid in stopped)
    waited = f"rank(s) {', '.join(map(str, victims))} waited {timeout_s} s (distributed.timeout_s)"
    if stalled:
        names = ", ".join(map(str, stalled))
        return f"rank(s) {names} stalled: {waited} for it in a collective; the job was stopped"
    silent = [rank for rank in range(world_size) if rank not in victims]
    named = f"rank(s) {', '.join(map(str, silent))}" if silent else "a rank on another machine"
    return f"{waited} for {named}, which stalled or died; the job was stopped"
