#!/usr/bin/env bash
# The offline quickstart on the built-in SmolLM2-135M-Instruct (run by `make demo`).
# Each step writes a run dir under runs/; --force makes a re-run start clean.
set -euo pipefail
cd "$(dirname "$0")/.."
still=.venv/bin/still
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1. fine-tune a LoRA teacher on the Python-docs domain"
$still run recipes/quickstart/teacher.yaml --force
