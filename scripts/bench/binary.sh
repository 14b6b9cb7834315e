# Sourced by the benchmarks that run the kdpipe binary over whole stages: fetches the
# models (the 1.5B too when $large_models is set), builds, and sets $kdpipe to a copy of the
# binary in $work, so a rebuild during the benchmark does not change what it measures.
# Usage: `. scripts/bench/binary.sh` with $work (and optionally large_models=1) set.
./scripts/fetch-models.sh ${large_models:+--large} >&2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked >&2
mkdir -p "$work"
cp "$CARGO_TARGET_DIR/release/kdpipe" "$work/kdpipe"
kdpipe="$work/kdpipe"
