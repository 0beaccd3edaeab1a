# Every target creates .venv itself (scripts/setup.sh) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all lint bench setup clean

setup:
	bash scripts/setup.sh dev

# The quickstart on the built-in SmolLM2, offline: recipes/quickstart/pipeline.yaml fine-tunes a
# LoRA teacher on the bundled Python-docs domain, distils two students and compares them all
# (stages already complete and unchanged are skipped).
demo:
	bash scripts/setup.sh dev
	bash scripts/quickstart.sh

# Lint (config in pyproject.toml), then the default suite: fast tests, plus one run of the real
# built-in SmolLM2 for a few steps.
test:
	bash scripts/setup.sh dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint:
	bash scripts/setup.sh dev
	$(VENV)/bin/ruff check .

# Everything, including tests marked slow.
test-all:
	bash scripts/setup.sh dev
	$(PY) -m pytest -q -m "not gpu"

bench:
	bash scripts/setup.sh dev,bench
	$(PY) benchmarks/kd_memory.py
	$(PY) benchmarks/eval_vs_lm_eval.py
	$(PY) benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) runs
