#!/usr/bin/env bash
# The whole test suite: fetch the real models (once), then every test in release mode
# (tests that run a model need optimized candle).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
cargo test --release --locked "$@"
