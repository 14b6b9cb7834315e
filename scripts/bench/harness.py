"""What every kdpipe benchmark shares: each side runs REPS times, interleaved (A B A B …);
the machine's load average and the CPU share other processes used are printed before each
run; results are shown as median and range; a ratio whose per-repetition range spans 1.0
is called a tie; and the table is not written when another job was running (unless
--allow-load, which the table then states).

A side is a command that prints one JSON object as the last line of its stdout; the
harness adds the run's wall seconds, peak RSS and CPU seconds (user + system; both from
wait4, so only that process tree's). A side can also be measured by the caller and handed over with
`record`, for servers the harness does not run itself.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# A run is refused when more than this share of the CPUs was busy just before it: nothing
# else should run during a benchmark (the harness itself sleeps while it samples).
BUSY_LIMIT = 0.15


def cpu_busy(seconds=2.0):
    """Share of all CPUs' time spent not idle over `seconds`, from /proc/stat."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = max(total1 - total0, 1)
    return 1.0 - (idle1 - idle0) / total


def add_arguments(parser):
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every side (at least 3 for a table)")
    parser.add_argument(
        "--allow-load",
        action="store_true",
        help="write the table even when another job was running before a run (the table says so)",
    )


class Bench:
    def __init__(self, args, title):
        self.reps = args.reps
        self.allow_load = args.allow_load
        self.title = title
        self.results = {}  # side -> [metrics per repetition]
        self.loads = []  # (side, rep, loadavg, busy)
        self.order = []

    def before_run(self, side, rep):
        busy = cpu_busy()
        load = os.getloadavg()
        self.loads.append((side, rep, load, busy))
        flag = "  <- another job is running" if busy > BUSY_LIMIT else ""
        print(
            f"[{self.title}] rep {rep + 1}/{self.reps} {side}: load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"CPU busy before the run {busy:.0%}{flag}",
            file=sys.stderr,
            flush=True,
        )

    def run(self, side, rep, cmd, env=None, cwd=None, parse=None, stderr=None):
        """Run one side once; returns its JSON with wall_s, peak_rss_mb and cpu_s added. `parse`
        turns the list of JSON lines the command printed into its metrics (default: the
        last line). `stderr`: a file the command's stderr goes to (default: this one's)."""
        self.before_run(side, rep)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"[{self.title}] {side} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
        lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        if not lines and not parse:
            sys.exit(f"[{self.title}] {side} printed no JSON line: {out[-2000:]}")
        metrics = parse(lines) if parse else lines[-1]
        metrics.setdefault("wall_s", round(wall, 2))
        metrics["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
        metrics["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
        self.record(side, metrics)
        return metrics

    def record(self, side, metrics):
        took = metrics.get("wall_s", metrics.get("job_s"))
        if took is not None:
            print(f"[{self.title}]   {side}: done in {took:.1f} s", file=sys.stderr, flush=True)
        if side not in self.results:
            self.results[side] = []
            self.order.append(side)
        self.results[side].append(metrics)

    def values(self, side, metric):
        return [r[metric] for r in self.results.get(side, []) if r.get(metric) is not None]

    def cell(self, side, metric, digits=1):
        """'median (min–max)' of a metric over the repetitions."""
        v = self.values(side, metric)
        if not v:
            return "–"
        med = statistics.median(v)
        if len(v) == 1:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"

    def ratio(self, side, anchor, metric, higher_is_better=True):
        """Ratio of medians, side / anchor (or anchor / side where lower is better), with the
        range of the per-repetition ratios (rep i of one side against rep i of the other,
        as they ran next to each other); 'tie' when that range spans 1.0."""
        a, b = self.values(side, metric), self.values(anchor, metric)
        if not a or not b:
            return "–"
        med = statistics.median(a) / statistics.median(b)
        pairs = [x / y for x, y in zip(a, b)]
        if not higher_is_better:
            med = 1 / med
            pairs = [1 / p for p in pairs]
        lo, hi = min(pairs), max(pairs)
        verdict = " tie" if lo <= 1.0 <= hi else ""
        return f"{med:.2f}× ({lo:.2f}–{hi:.2f}){verdict}"

    def busy_runs(self):
        return [(s, r, b) for s, r, _, b in self.loads if b > BUSY_LIMIT]

    def load_note(self):
        loads = [l[0] for _, _, l, _ in self.loads]
        busy = [b for *_, b in self.loads]
        note = (
            f"Before each of the {len(self.loads)} runs: 1-minute load average {min(loads):.2f}–{max(loads):.2f} "
            f"(the previous run's own tail), CPU busy in the 2 s before the run {min(busy):.0%}–{max(busy):.0%}."
        )
        bad = self.busy_runs()
        if bad:
            note += (
                f" **Written with --allow-load: {len(bad)} runs started while another job used more than "
                f"{BUSY_LIMIT:.0%} of the CPUs; their figures are not trustworthy.**"
            )
        return note

    def write(self, path, text):
        """Write the table atomically, unless the load says another job was running."""
        bad = self.busy_runs()
        if bad and not self.allow_load:
            print(text)
            sys.exit(
                f"[{self.title}] not writing {path}: {len(bad)} runs started while another job was using "
                f"the CPUs ({', '.join(f'{s} rep {r + 1} {b:.0%}' for s, r, b in bad)}). "
                "Rerun on a quiet machine, or pass --allow-load (the table will say so)."
            )
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        print(text)


def cpu_description():
    """The CPU's model name and which of the SIMD extensions kdpipe's kernels pick between
    it has (the kernels, and llama.cpp's native build, differ by them)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"]
    have = [f for f in wanted if f in flags]
    lacks = [f for f in wanted if f not in flags]
    return f"{model}; has {', '.join(have) or 'none of ' + ', '.join(wanted)}" + (
        f"; lacks {', '.join(lacks)}" if lacks else ""
    )


def command_args():
    """The arguments the user gave the bench's shell script (it passes them in
    KDPIPE_BENCH_ARGS), for the table's command line."""
    args = os.environ.get("KDPIPE_BENCH_ARGS", "").strip()
    return f" {args}" if args else ""


def median_range_header():
    return "Each cell: median (min–max) over the repetitions. Ratios: of medians, with the range of per-repetition ratios; a range that spans 1.0 is a tie."


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="print the CPU share busy over 2 s")
    print(f"{cpu_busy():.3f}")
