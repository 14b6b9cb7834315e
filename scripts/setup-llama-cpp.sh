#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` and `llama-batched-bench` for the teacher benchmark,
# from the llama.cpp source that the newest llama-cpp-python sdist on PyPI vendors
# (native CPU flags, OpenMP, Release). Prints the folder holding the two binaries.
#
# The first run downloads the sdist (75 MB), cmake and ninja (PyPI wheels) and compiles
# (about 10 minutes on 2 cores); later runs print the cached folder at once.
#
#   KDPIPE_LLAMA_CPP_VERSION  llama-cpp-python version whose vendored llama.cpp is built
#                             (default 0.3.36, the newest on PyPI when this was written)
#   KDPIPE_LLAMA_CPP_DIR      where to build (default ~/.cache/kdpipe/llama.cpp-VERSION)
set -euo pipefail
version="${KDPIPE_LLAMA_CPP_VERSION:-0.3.36}"
dir="${KDPIPE_LLAMA_CPP_DIR:-$HOME/.cache/kdpipe/llama.cpp-$version}"
bin="$dir/build/bin"
# Native flags plus llama-cpp-flags.sh's (no AMX: it crashes on the Xeon VMs CI runs on).
. "$(dirname "$0")/llama-cpp-flags.sh"
no_amx="$llama_cpp_extra_flags"
stamp="$dir/build/kdpipe-build-flags"
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-batched-bench" ] &&
  [ "$(cat "$stamp" 2>/dev/null)" = "$no_amx" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$dir"

# The sdist, straight from the index (pip would try to build it to read its metadata),
# checked against the sha256 the index publishes.
sdist="$dir/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  url="$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ |
    grep -o "https://[^\"]*llama_cpp_python-$version.tar.gz#sha256=[0-9a-f]*" | head -n1)"
  [ -n "$url" ] || { echo "setup-llama-cpp: no sdist of llama-cpp-python $version on PyPI" >&2; exit 1; }
  echo "setup-llama-cpp: downloading llama-cpp-python $version (sdist)" >&2
  curl -fsSL -o "$sdist.tmp" "${url%%#*}"
  [ "$(sha256sum "$sdist.tmp" | cut -d' ' -f1)" = "${url##*sha256=}" ] ||
    { rm -f "$sdist.tmp"; echo "setup-llama-cpp: sha256 mismatch for the sdist" >&2; exit 1; }
  mv "$sdist.tmp" "$sdist"
fi
src="$dir/llama_cpp_python-$version/vendor/llama.cpp"
[ -d "$src" ] || tar -xzf "$sdist" -C "$dir"

tools="$dir/tools-venv"
if ! "$tools/bin/cmake" --version >/dev/null 2>&1; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --only-binary=:all: cmake ninja >&2
fi
export PATH="$tools/bin:$PATH"
echo "setup-llama-cpp: building llama-server and llama-batched-bench (about 10 min, once)" >&2
cmake -S "$src" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" >&2
cmake --build "$dir/build" -j "$(nproc)" --target llama-server llama-batched-bench >&2
echo "$no_amx" > "$stamp"
echo "$bin"
