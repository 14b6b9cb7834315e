"""The training benchmark behind scripts/bench/train.sh: kdpipe against PyTorch at its best
on the same SmolLM2-135M weights and token ids, batch × seq, in full fine-tuning and LoRA,
each in f32 and bf16 mixed precision. Every side runs --reps times, interleaved, with
--warmup untimed and --steps timed steps; see harness.py for the method.

PyTorch's allocator is chosen first: one probe run each with glibc malloc, jemalloc and
tcmalloc (LD_PRELOAD, Debian's libjemalloc2 and libtcmalloc-minimal4), the fastest used for
every PyTorch row. torch.compile is a column of its own when it runs here.
"""
import argparse
import json
import os
import subprocess
import sys

import harness

ALLOCATORS = {
    "glibc malloc": None,
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}

p = argparse.ArgumentParser()
p.add_argument("--bin", required=True, help="kdpipe's train_bench example")
p.add_argument("--py", required=True, help="python of the venv with torch, transformers, peft")
p.add_argument("--model-dir", required=True, help="where to export the HF folder PyTorch loads")
p.add_argument("--out", default="bench-results/train.md")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--modes", default="full,lora")
p.add_argument("--precisions", default="f32,bf16")
p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
harness.add_arguments(p)
a = p.parse_args()
threads = os.cpu_count()
script = os.path.join(os.path.dirname(__file__), "torch_train_bench.py")
bench = harness.Bench(a, "train bench")


def kdpipe_cmd(mode, precision, warmup, steps):
    return [a.bin, mode, precision, str(a.batch), str(a.seq), str(warmup), str(steps)]


def torch_cmd(mode, precision, warmup, steps, compile_=False, config_out=None):
    cmd = [a.py, script, a.model_dir, mode, precision, str(a.batch), str(a.seq), str(warmup), str(steps), str(threads)]
    if compile_:
        cmd.append("--compile")
    if config_out:
        cmd += ["--config-out", config_out]
    return cmd


def env_with(allocator):
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if ALLOCATORS[allocator]:
        env["LD_PRELOAD"] = ALLOCATORS[allocator]
    return env


precisions = a.precisions.split(",")
if "bf16" in precisions and "avx512_bf16" not in open("/proc/cpuinfo").read():
    print("train bench: this CPU lacks AVX512-BF16, so no bf16 rows", file=sys.stderr)
    precisions.remove("bf16")
cases = [(m, pr) for pr in precisions for m in a.modes.split(",")]

# The same weights for both: kdpipe exports its loaded GGUF as an HF folder.
subprocess.run([a.bin, "full", "f32", "1", "8", "0", "1", a.model_dir], check=True, stdout=subprocess.DEVNULL)

# The allocator probe: full bf16 (or f32), the mode where memory traffic is heaviest.
probe_case = ("full", precisions[-1])
probe = {}
for name, path in ALLOCATORS.items():
    if path and not os.path.exists(path):
        print(f"train bench: {path} missing (apt-get install libjemalloc2 libtcmalloc-minimal4)", file=sys.stderr)
        continue
    bench.before_run(f"allocator probe {name}", 0)
    out = subprocess.run(torch_cmd(*probe_case, a.warmup, 8), env=env_with(name), capture_output=True, text=True, check=True)
    probe[name] = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
    print(f"train bench: PyTorch {probe_case} with {name}: {probe[name]} tok/s", file=sys.stderr)
allocator = max(probe, key=probe.get)
torch_env = env_with(allocator)

# torch.compile, if it runs here.
compile_ok, compile_note = False, "left out (--no-compile)"
if not a.no_compile:
    r = subprocess.run(torch_cmd("lora", "f32", 2, 1, compile_=True), env=torch_env, capture_output=True, text=True)
    compile_ok = r.returncode == 0
    compile_note = "runs here" if compile_ok else "failed here: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    print(f"train bench: torch.compile {compile_note}", file=sys.stderr)

config_out = os.path.join(os.path.dirname(a.out), "train-torch-config.txt")
sides = ["kdpipe", "PyTorch"] + (["PyTorch + compile"] if compile_ok else [])
for rep in range(a.reps):
    for mode, precision in cases:
        key = f"{mode} {precision}"
        bench.run(f"kdpipe {key}", rep, kdpipe_cmd(mode, precision, a.warmup, a.steps))
        bench.run(
            f"PyTorch {key}",
            rep,
            torch_cmd(mode, precision, a.warmup, a.steps, config_out=config_out if rep == 0 else None),
            env=torch_env,
        )
        if compile_ok:
            bench.run(f"PyTorch + compile {key}", rep, torch_cmd(mode, precision, a.warmup, a.steps, compile_=True), env=torch_env)

torch_row = bench.results[f"PyTorch {cases[0][0]} {cases[0][1]}"][0]
lines = [
    f"# Training speed: kdpipe vs PyTorch\n",
    f"SmolLM2-135M, batch {a.batch} × seq {a.seq}, {a.warmup} warm-up and {a.steps} timed steps a run, "
    f"{a.reps} runs a side interleaved, {threads} threads, AdamW, gradient clipping at 1.0. "
    f"PyTorch side: {torch_row['engine'].split(' + ')[0]} with transformers (SDPA attention: `{torch_row['attention']}`), "
    f"PEFT for LoRA (rank 16, alpha 32, the same 7 targets), fused AdamW, `use_cache=False`, "
    f"bf16 = CPU autocast; allocator {allocator} (probe, {probe_case[0]} {probe_case[1]}, tok/s: "
    + ", ".join(f"{k} {v}" for k, v in probe.items())
    + f"). torch.compile {compile_note}. torch build: `{os.path.basename(config_out)}`.\n",
    "Command: `scripts/bench/train.sh" + harness.command_args() + "`\n",
    harness.median_range_header() + "\n",
]
head = "| mode | precision | kdpipe tok/s | PyTorch tok/s |"
sep = "|---|---|---:|---:|"
if compile_ok:
    head += " PyTorch + compile tok/s |"
    sep += "---:|"
head += " kdpipe / PyTorch |" + (" kdpipe / compile |" if compile_ok else "")
sep += "---:|" + ("---:|" if compile_ok else "")
head += " kdpipe peak RSS MiB | PyTorch peak RSS MiB |" + (" compile peak RSS MiB |" if compile_ok else "")
sep += "---:|---:|" + ("---:|" if compile_ok else "")
lines += [head, sep]
for mode, precision in cases:
    key = f"{mode} {precision}"
    row = f"| {mode} | {precision} | {bench.cell('kdpipe ' + key, 'tokens_per_s')} | {bench.cell('PyTorch ' + key, 'tokens_per_s')} |"
    if compile_ok:
        row += f" {bench.cell('PyTorch + compile ' + key, 'tokens_per_s')} |"
    row += f" {bench.ratio('kdpipe ' + key, 'PyTorch ' + key, 'tokens_per_s')} |"
    if compile_ok:
        row += f" {bench.ratio('kdpipe ' + key, 'PyTorch + compile ' + key, 'tokens_per_s')} |"
    row += f" {bench.cell('kdpipe ' + key, 'peak_rss_mb', 0)} | {bench.cell('PyTorch ' + key, 'peak_rss_mb', 0)} |"
    if compile_ok:
        row += f" {bench.cell('PyTorch + compile ' + key, 'peak_rss_mb', 0)} |"
    lines.append(row)
lines += ["", bench.load_note(), ""]
bench.write(a.out, "\n".join(lines))
