#!/usr/bin/env bash
# The quickstart's pipeline on the second domain (data/debpkgs: what Debian packages do), with
# the quickstart's defaults unchanged: fine-tune a teacher, distil the carved student and its
# hard-label baseline (each ending with its retention table), score all against the base.
# Not part of `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
still=.venv/bin/still
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$still run recipes/debpkgs/teacher.yaml --force
$still run recipes/debpkgs/student.yaml --force
$still run recipes/debpkgs/student-sft.yaml --force
$still run recipes/debpkgs/eval.yaml
echo "== done: runs/debpkgs-compare/compare.md"
