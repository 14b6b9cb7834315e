#!/usr/bin/env bash
# The whole test suite: fetch the real models, install the real OpenAI-compatible server
# the API tests talk to and transformers for the export round trip (each once, cached
# under ~/.cache/kdpipe), then every test
# in release mode (tests that run a model need optimized candle). Ends with one
# "N passed, N failed" line and exits non-zero when any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
KDPIPE_LLAMA_PYTHON="$(./scripts/setup-llama-server.sh)"
export KDPIPE_LLAMA_PYTHON
KDPIPE_HF_PYTHON="$(./scripts/setup-hf.sh)"
export KDPIPE_HF_PYTHON
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# The reliability suites (crash, faults, bad inputs, secrets, storage) leave their counts
# here; cargo hides a passing test's output.
counts="${CARGO_TARGET_DIR:-target}/tmp/suite-counts"
rm -rf "$counts"
status=0
cargo test --release --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
passed="$(grep -oE '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')"
failed="$(grep -oE '[0-9]+ failed' "$log" | awk '{s += $1} END {print s + 0}')"
if [ -d "$counts" ]; then
  echo "reliability suites:"
  cat "$counts"/*.txt | sed 's/^/  /'
fi
echo "$passed passed, $failed failed"
exit "$status"
