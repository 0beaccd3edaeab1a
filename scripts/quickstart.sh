#!/usr/bin/env bash
# The offline quickstart on the built-in SmolLM2-135M-Instruct (run by `make demo`): one pipeline
# (recipes/quickstart/pipeline.yaml) that fine-tunes a teacher, distils a compact student (and a
# hard-label baseline), scores all of them against the base model, and compares. Stages already
# complete and unchanged are skipped; pass --force to run every stage again, or --from STAGE.
set -euo pipefail
cd "$(dirname "$0")/.."
still=.venv/bin/still
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

$still run recipes/quickstart/pipeline.yaml "$@"
echo "== done: runs/pydocs-compare/compare.md and compare.png"
