#!/usr/bin/env bash
# The CUDA checks and benchmarks in one go, most important first, each under its own time limit
# so a cut-short session still leaves results: the GPU tests, SFT throughput with MFU on a 1.7B
# shape (still vs plain HF padding vs the block mask vs packed sdpa's loop vs TRL), Liger, chunked
# CE and gradient checkpointing, compile attribution, the 135M shape, KD memory. Logs and JSON go
# to $OUT (default ./bench-out).
#
#   bash benchmarks/gpu_suite.sh SRC      # SRC: a model dir with config + tokenizer (see random_models.py)
#
# Env: BUDGET (seconds for the whole suite, default 560), PY (python), DRY=1 (CPU, tiny shape:
# checks this script). If ./.whl holds wheels (a machine without a package index), they are
# installed to /tmp/site first.
set -u
SRC=${1:?usage: gpu_suite.sh SRC_MODEL_DIR}
START=$(date +%s)
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
PY=${PY:-python3}
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - START) )); }
step() { echo; echo "=== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false STILL_CACHE=${STILL_CACHE:-/tmp/still-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${DRY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  step "install wheels from .whl"
  [ -d /tmp/site/trl ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -z "${DRY:-}" ]; then
  DEV=cuda; SMALL=smollm2-135m; BIG=smollm2-1.7b; S1=20; B1=32; S2=15; B2=16
  KD="--batch 8 --seq 2048 --vocab 151936 --hidden 2048 --teacher-hidden 3584 --dtype bfloat16"
else
  DEV=cpu; SMALL=tiny; BIG=tiny; S1=3; B1=4; S2=2; B2=4
  KD="--batch 1 --seq 64 --vocab 512 --hidden 32 --teacher-hidden 48"
fi
step "versions"
$PY -c "
import importlib.metadata as m, torch
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return 'not installed'
print(', '.join(f'{n} {version(n)}' for n in ['torch', 'transformers', 'peft', 'accelerate', 'trl', 'datasets', 'liger-kernel', 'triton']))
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
step "models"
[ -d /tmp/models/$BIG ] || $PY benchmarks/random_models.py "$SRC" /tmp/models "$(echo "$SMALL,$BIG" | tr ',' '\n' | sort -u | paste -sd,)"
if [ -z "${DRY:-}" ]; then
  step "gpu tests"
  # -v: each test's outcome is written as it ends, so a timeout still says which ones ran.
  timeout 150 $PY -m pytest -v --tb=short -m gpu tests/recipes/test_gpu.py -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
  echo "rc=$? (124: the time limit cut it short)"
  grep -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)|passed|failed" "$OUT/gpu_tests.log" | head -20
  # The failures' own text (the assertion, the captured `still: error:` line), not just the name.
  sed -n '/= FAILURES =/,/short test summary/p' "$OUT/gpu_tests.log" | grep -vE "^\s*$" | head -60
fi
bench() {  # name, seconds, benchmark arguments...
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt 30 ] || { echo "skipped $name: no time left"; return; }
  step "sft $name"
  timeout "$limit" $PY benchmarks/sft_throughput.py --device $DEV --json "$OUT/sft_$name.json" "$@" \
    > "$OUT/sft_$name.log" 2> "$OUT/sft_$name.err"
  echo "rc=$?"; cat "$OUT/sft_$name.log"; grep -E "^    |Error" "$OUT/sft_$name.err" | tail -8
}
bench big 210 --model /tmp/models/$BIG --variants still,hf,still-blockmask,still-loop,trl --steps $S2 --batch-size $B2
bench liger $(( $(left) > 140 ? 140 : $(left) - 5 )) --model /tmp/models/$BIG --variants still,still-liger,still-fullce,still-gc --steps $S2 --batch-size $B2
bench compile $(( $(left) > 180 ? 180 : $(left) - 5 )) --model /tmp/models/$BIG --variants still,still-compile --steps $S2 --batch-size $B2 --warmup-steps 3
bench small $(( $(left) > 120 ? 120 : $(left) - 5 )) --model /tmp/models/$SMALL --variants still,trl,hf --steps $S1 --batch-size $B1
step "kd memory"
[ "$(left)" -gt 40 ] && timeout $(( $(left) - 5 )) $PY benchmarks/kd_memory.py --device $DEV $KD --repeats 1 2>&1 | tail -12
step "done"
