"""Two builds of kdpipe side by side, for changes that must not change speed (a refactor):
the training step (train_bench) and the local teacher engine (teacher_bench: the job and
raw decoding), each side --reps times, interleaved, on a quiet machine (harness.py).

    python scripts/bench/ab.py --a DIR_A --b DIR_B [--label-a before] [--label-b after]
        [--model models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf] [--reps 3] [--out FILE]

DIR_A and DIR_B each hold the `train_bench` and `teacher_bench` example binaries of one
build (copy them out of target/release/examples/). Prints one table, writes it to --out
when given.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import harness

p = argparse.ArgumentParser()
p.add_argument("--a", required=True)
p.add_argument("--b", required=True)
p.add_argument("--label-a", default="A")
p.add_argument("--label-b", default="B")
p.add_argument("--model", default="models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
p.add_argument("--config", default="configs/arith.toml")
p.add_argument("--n", type=int, default=48)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--out")
harness.add_arguments(p)
a = p.parse_args()
bench = harness.Bench(a, "A/B")
work = tempfile.mkdtemp()
builds = [(a.label_a, a.a), (a.label_b, a.b)]
chats = os.path.join(work, "chats.jsonl")
subprocess.run([os.path.join(a.a, "teacher_bench"), "chats", a.config, a.model, str(a.n), chats], check=True, stdout=subprocess.DEVNULL)
cases = {
    "train full f32": lambda d: [os.path.join(d, "train_bench"), "full", "f32", "4", "256", "3", str(a.steps)],
    "train lora bf16": lambda d: [os.path.join(d, "train_bench"), "lora", "bf16", "4", "256", "3", str(a.steps)],
    "teacher job": lambda d: [os.path.join(d, "teacher_bench"), "batched", a.model, chats, "128", "32"],
    "teacher raw": lambda d: [os.path.join(d, "teacher_bench"), "raw", a.model, "256", "128", "32"],
}
metric = {"train full f32": "tokens_per_s", "train lora bf16": "tokens_per_s", "teacher job": "generated_tok_s", "teacher raw": "speed_tg"}
for rep in range(a.reps):
    for case, cmd in cases.items():
        for label, d in builds:
            bench.run(f"{case} {label}", rep, cmd(d))
lines = [
    f"# {a.label_b} against {a.label_a}\n",
    f"{a.reps} runs a side, interleaved; training: SmolLM2-135M, 4 × 256, 3 warm-up and {a.steps} timed steps; "
    f"teacher: {os.path.basename(a.model)}, {a.n} chats of `{a.config}` (generated tokens per second of the job) "
    "and raw decoding at 32 sequences (llama-batched-bench's method).\n",
    harness.median_range_header() + "\n",
    f"| case | metric | {a.label_a} | {a.label_b} | {a.label_b} / {a.label_a} | peak RSS MiB {a.label_a} | peak RSS MiB {a.label_b} |",
    "|---|---|---:|---:|---:|---:|---:|",
]
for case in cases:
    m = metric[case]
    x, y = f"{case} {a.label_a}", f"{case} {a.label_b}"
    lines.append(
        f"| {case} | {m} | {bench.cell(x, m)} | {bench.cell(y, m)} | {bench.ratio(y, x, m)} | "
        f"{bench.cell(x, 'peak_rss_mb', 0)} | {bench.cell(y, 'peak_rss_mb', 0)} |"
    )
lines += ["", bench.load_note(), ""]
text = "\n".join(lines)
if a.out:
    bench.write(a.out, text)
else:
    if bench.busy_runs() and not a.allow_load:
        sys.exit("another job was running during the runs; rerun on a quiet machine or pass --allow-load")
    print(text)
