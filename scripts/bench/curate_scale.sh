#!/usr/bin/env bash
# How `kdpipe curate` grows with the number of teacher rows: synthetic rows
# (`examples/synth_teacher_rows.rs`, 4 samples an input, every rule with work to do, the
# settings of scripts/bench/curate.sh) at each size, `kdpipe curate` on them, its wall
# time, CPU time (user + system, both cores together) and peak RSS (the whole process, from
# wait4's rusage). Prints two tables. CPU time that grows with the rows where wall time
# grows faster is time spent waiting on the disk.
#
# TOPK=20 gives every row token top-20 soft labels (a local teacher's rows; most of their
# bytes). BASELINE=/path/to/an/older/kdpipe runs that binary too, interleaved with this
# one on the same rows, REPS times each (default 1): the same-run comparison for a change
# to curate. Medians, with the range in brackets when REPS > 1. A second table gives the
# peak RSS and the seconds of each pass of curate (RSS sampled from /proc every 0.2 s;
# passes told apart by the progress lines curate prints on stderr): where the memory and
# the time go.
#
# A third table gives the microseconds a teacher row at each size, and their ratio to the
# first size given: 1.00 is time growing linearly with the rows.
#
# ROWS_CACHE=DIR keeps each size's synthetic rows in DIR/<size>M-topk<k> (generated once,
# reused by later runs: 100M rows take ~15 min to generate here). CURRENT=/path/to/kdpipe
# times that binary instead of the one this script builds (e.g. a copy, so a build can go on).
# The sides must keep the same rows unless ROWS_MAY_DIFFER=1 (a change to what a rule
# decides); each side's own rows out are printed, and one binary must keep the same rows
# in every run. FEATURES=… builds with those cargo features (e.g. mistralrs, to reuse the
# test suite's build).
#
#   [TOPK=20] [BASELINE=…] [REPS=3] [ROWS_CACHE=…] [CURRENT=…] scripts/bench/curate_scale.sh [MILLIONS...]
#   (default sizes: 1 2 4)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/curate-bench-config.sh
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 2 4)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked ${FEATURES:+--features "$FEATURES"} --bin kdpipe --example synth_teacher_rows >&2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "| binary | teacher rows | top-k | teacher files MB | curate s | CPU s | peak RSS MiB | rows / s | rows out |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for m in "${sizes[@]}"; do
  if [ -n "${ROWS_CACHE:-}" ]; then
    work="$ROWS_CACHE/${m}M-topk${TOPK:-0}"
  else
    work="$tmp/rows"
    rm -rf "$work"
  fi
  if [ ! -e "$work/rows-complete" ]; then
    rm -rf "$work/runs"
    mkdir -p "$work"
    inputs=$(python3 -c "print(int($m * 1e6 / 4))")
    "$CARGO_TARGET_DIR/release/examples/synth_teacher_rows" "$inputs" 4 "$work/runs/bench" "$work/eval.jsonl" "${TOPK:-0}" >&2
    touch "$work/rows-complete"
  fi
  write_curate_bench_config "$work/bench.toml"
  python3 - "${CURRENT:-$CARGO_TARGET_DIR/release/kdpipe}" "$work" "${BASELINE:-}" "${REPS:-1}" "${TOPK:-0}" "$tmp/per-row.jsonl" 3>>"$tmp/phases" <<'PY'
import collections, json, os, re, statistics, subprocess, sys, threading, time
current, work, baseline, reps, topk, per_row = sys.argv[1:7]
reps = int(reps)
sides = [("this", current)] + ([("baseline", baseline)] if baseline else [])
runs = {name: [] for name, _ in sides}
rows_out = {}
may_differ = os.environ.get("ROWS_MAY_DIFFER") == "1"
PASSES = ["partition", "head rules", "clusters", "split files"]


def pass_after(line, now):
    """The pass curate is in after printing `line` (its progress lines name them)."""
    if re.search(r"rows in \d+ parts", line):
        return "head rules"
    m = re.search(r"(rules on part|clusters, bucket) (\d+)/(\d+)", line)
    if m:
        last = m.group(2) == m.group(3)
        if m.group(1) == "rules on part":
            return "clusters" if last else "head rules"
        return "split files" if last else "clusters"
    if "split files" in line:
        return "split files"
    return now


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# One curate run: wall seconds, peak RSS (MB, from wait4's rusage of this one child), the
# peak RSS sampled in each pass (and its seconds), rows out, CPU seconds (user + system).
Run = collections.namedtuple("Run", "wall rss peaks rows_out cpu")


def curate(binary):
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "curate", "--config", "bench.toml"], cwd=work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = {"pass": "partition", "err": [], "began": {"partition": t0}}

    def follow():
        for line in p.stderr:
            state["err"].append(line)
            now = pass_after(line, state["pass"])
            state["began"].setdefault(now, time.monotonic())
            state["pass"] = now

    reader = threading.Thread(target=follow)
    reader.start()
    peaks = {}
    while True:
        done, status, usage = os.wait4(p.pid, os.WNOHANG)
        if done:
            break
        now = state["pass"]
        peaks[now] = max(peaks.get(now, 0.0), rss_mb(p.pid))
        time.sleep(0.2)
    reader.join()
    wall = time.monotonic() - t0
    if status != 0:
        sys.exit("".join(state["err"]))
    out = json.load(open(os.path.join(work, "runs/bench/curate/report.json")))
    kept = (out["rows_out"], json.dumps(out["splits"], sort_keys=True))
    rows_out.setdefault(binary, set()).add(kept)
    if len(rows_out[binary]) > 1:
        sys.exit(f"{binary} kept different rows from one run to the next: {rows_out[binary]}")
    if len({k for ks in rows_out.values() for k in ks}) > 1 and not may_differ:
        sys.exit(f"the binaries kept different rows: {rows_out} "
                 "(ROWS_MAY_DIFFER=1 when a change means to)")
    # Seconds in each pass: from its first progress line to the next pass's (the last
    # pass ends with the process).
    began = sorted((t, k) for k, t in state["began"].items())
    ends = [t for t, _ in began[1:]] + [t0 + wall]
    peaks["seconds"] = {k: end - t for (t, k), end in zip(began, ends)}
    return Run(wall, usage.ru_maxrss / 1024, peaks, out["rows_out"], usage.ru_utime + usage.ru_stime)


for rep in range(reps):
    for name, binary in (sides if rep % 2 == 0 else sides[::-1]):
        runs[name].append(curate(binary))

r = json.load(open(os.path.join(work, "runs/bench/curate/report.json")))
gen = os.path.join(work, "runs/bench/generate")
mb = sum(os.path.getsize(os.path.join(gen, f)) for f in os.listdir(gen) if f.endswith(".parquet")) / 1e6


def shown(values, digits):
    med = statistics.median(values)
    spread = f" ({min(values):,.{digits}f}–{max(values):,.{digits}f})" if len(values) > 1 else ""
    return med, f"{med:,.{digits}f}{spread}"


for name, _ in sides:
    wall, wall_text = shown([run.wall for run in runs[name]], 1)
    _, cpu_text = shown([run.cpu for run in runs[name]], 1)
    _, rss_text = shown([run.rss for run in runs[name]], 0)
    print(f"| {name} | {r['rows_in']:,} | {topk} | {mb:,.0f} | {wall_text} | {cpu_text} | {rss_text} | "
          f"{r['rows_in'] / wall:,.0f} | {runs[name][0].rows_out:,} |", flush=True)
    # Per pass: the largest sample over the runs (a pass shorter than 0.2 s may have none).
    # A binary that prints no progress lines (an older one) has its whole run as "partition".
    peaks = [run.peaks for run in runs[name]]
    cells = [f"{max(p[k] for p in peaks if k in p):,.0f}"
             if any(k in p for p in peaks) else "—" for k in PASSES]
    # and the median seconds in each pass
    cells += [f"{statistics.median(p['seconds'].get(k, 0.0) for p in peaks):,.0f}"
              if any(k in p["seconds"] for p in peaks) else "—" for k in PASSES]
    with os.fdopen(3, "w", closefd=False) as phases:
        print(f"| {name} | {r['rows_in']:,} | " + " | ".join(cells) + " |", file=phases)
    with open(per_row, "a") as f:
        print(json.dumps({"side": name, "rows": r["rows_in"],
                          "wall": [run.wall / r["rows_in"] * 1e6 for run in runs[name]],
                          "cpu": [run.cpu / r["rows_in"] * 1e6 for run in runs[name]]}), file=f)
PY
done
echo
echo "Peak RSS MiB sampled in each pass of curate, then the seconds each pass took (median):"
echo
echo "| binary | teacher rows | MB partition | MB head rules | MB clusters | MB split files | s partition | s head rules | s clusters | s split files |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
cat "$tmp/phases"
echo
echo "Microseconds a teacher row, and its ratio to the first size's (linear growth is 1.00;"
echo "the ratio's range divides each run's extremes by the other size's, so 1.00 inside it is a tie):"
echo
python3 - "$tmp/per-row.jsonl" <<'PY'
import json, statistics, sys
first = {}
print("| binary | teacher rows | µs a row | × first size | CPU µs a row | × first size |")
print("|---|---:|---:|---:|---:|---:|")
for line in open(sys.argv[1]):
    size = json.loads(line)
    base = first.setdefault(size["side"], size)
    cells = []
    for key in ("wall", "cpu"):
        ours, theirs = size[key], base[key]
        ratio = statistics.median(ours) / statistics.median(theirs)
        spread = f" ({min(ours) / max(theirs):.2f}–{max(ours) / min(theirs):.2f})" if len(ours) > 1 else ""
        cells += [f"{statistics.median(ours):.2f}", "1 (the reference)" if size is base else f"{ratio:.2f}{spread}"]
    print(f"| {size['side']} | {size['rows']:,} | " + " | ".join(cells) + " |")
PY
