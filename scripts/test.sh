#!/usr/bin/env bash
# The whole test suite: fetch the real models (once), then every test in release mode
# (tests that run a model need optimized candle). Ends with one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --release --locked "$@" 2>&1 | tee "$log"
passed="$(grep -oE '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')"
failed="$(grep -oE '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')"
echo "$passed passed, $failed failed"
