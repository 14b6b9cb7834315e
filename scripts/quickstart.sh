#!/usr/bin/env bash
# The README's main job: fetch the models, build, and run the quickstart end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
cargo build --release --locked
bin="${CARGO_TARGET_DIR:-target}/release/kdpipe"
exec "$bin" run --config configs/quickstart.toml "$@"
