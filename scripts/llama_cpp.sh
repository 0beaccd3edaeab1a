#!/usr/bin/env bash
# The llama.cpp runtime (`still[gguf]`: llama-cpp-python, which vendors llama.cpp) for VENV.
# Usage: scripts/llama_cpp.sh [VENV]   (scripts/setup.sh runs it for the dev and gguf extras)
#
# PyPI ships it as source only, and a full build takes ~21 min of CPU. This builds the library
# alone (no server, tools, examples or multimodal) for AVX2 CPUs (not -march=native: its AMX
# kernels crash on some hosts, and a native wheel would not run on an older CPU), ~6.5 min of
# CPU, once: the wheel is kept in STILL_WHEEL_CACHE (default ~/.cache/still/wheels), so later
# setups, fresh clones and CI runs on the same machine install it in seconds.
set -euo pipefail
VENV="${1:-.venv}"
SPEC="llama-cpp-python==0.3.36"
WHEELS="${STILL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/still/wheels}"
python=("$VENV/bin/python")
if "${python[@]}" -c 'import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36")' 2>/dev/null
then
  exit 0
fi
if ! compgen -G "$WHEELS/llama_cpp_python-0.3.36-*.whl" >/dev/null; then
  mkdir -p "$WHEELS"
  echo "setup: building the llama.cpp runtime ($SPEC) once, cached in $WHEELS" \
       "(about 6.5 min of CPU: ~3.5 min on 2 idle cores)"
  start=$(date +%s)
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${python[@]}" -m pip wheel -q --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python "$SPEC" -w "$WHEELS"
  echo "setup: llama.cpp runtime built in $(( $(date +%s) - start )) s"
fi
"${python[@]}" -m pip install -q --disable-pip-version-check --find-links "$WHEELS" "$SPEC"
