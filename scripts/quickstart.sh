#!/usr/bin/env bash
# The offline quickstart on the built-in SmolLM2-135M-Instruct (run by `make demo`): fine-tune a
# teacher, distil a compact student (and a hard-label baseline), score all of them against the
# base model, and compare. Each step writes a run dir under runs/; --force re-runs start clean.
set -euo pipefail
cd "$(dirname "$0")/.."
still=.venv/bin/still
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1/4 fine-tune a LoRA teacher on the Python-docs domain"
$still run recipes/quickstart/teacher.yaml --force
echo "== 2/4 distil a student carved from the teacher (KD)"
$still run recipes/quickstart/student.yaml --force
echo "== 3/4 the same student on hard labels only (what KD buys)"
$still run recipes/quickstart/student-sft.yaml --force
echo "== 4/4 score base, teacher and students on held-out modules and compare"
$still run recipes/quickstart/eval.yaml
echo "== done: runs/pydocs-compare/compare.md and compare.png"
