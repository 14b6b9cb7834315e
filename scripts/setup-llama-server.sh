#!/usr/bin/env bash
# Install a real OpenAI-compatible server (llama-cpp-python's) into a private virtual
# environment, for the API-teacher tests and the teacher benchmark. Prints the venv's python.
#
# llama-cpp-python ships only as source on PyPI: the first run compiles llama.cpp (about
# 10 minutes on 2 cores) and keeps the wheel in KDPIPE_WHEEL_CACHE, so later runs take seconds.
#
#   KDPIPE_WHEEL_CACHE  (default ~/.cache/kdpipe/wheels)
#   KDPIPE_LLAMA_VENV   (default ~/.cache/kdpipe/llama-venv)
set -euo pipefail
version=0.3.16
# Native flags plus llama-cpp-flags.sh's (no AMX: it crashes on the Xeon VMs CI runs on).
# The wheel and the venv are kept per build flags, so a wheel built without them is not
# reused.
. "$(dirname "$0")/llama-cpp-flags.sh"
no_amx="$llama_cpp_extra_flags"
cache="${KDPIPE_WHEEL_CACHE:-$HOME/.cache/kdpipe/wheels}/no-amx"
venv="${KDPIPE_LLAMA_VENV:-$HOME/.cache/kdpipe/llama-venv}"
mkdir -p "$cache"

py="$venv/bin/python"
if [ -x "$py" ] && [ "$(cat "$venv/kdpipe-build-flags" 2>/dev/null)" = "$no_amx" ] &&
  "$py" -c "import llama_cpp, llama_cpp.server, uvicorn; assert llama_cpp.__version__ == '$version'" 2>/dev/null; then
  echo "$py"
  exit 0
fi

if ! ls "$cache"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "setup-llama-server: building llama-cpp-python $version from source (about 10 min, once)" >&2
  # cmake and ninja come from PyPI as build dependencies; no system packages are needed.
  CMAKE_ARGS="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip wheel --quiet --no-deps --no-cache-dir \
    --wheel-dir "$cache" "llama-cpp-python==$version" >&2
fi

rm -rf "$venv"
python3 -m venv "$venv"
"$py" -m pip install --quiet --find-links "$cache" \
  "llama-cpp-python[server]==$version" >&2
echo "$no_amx" > "$venv/kdpipe-build-flags"
echo "$py"
