"""The teacher benchmark behind scripts/bench/teacher.sh: kdpipe's local engines against
llama.cpp at its best (its own llama-server and llama-batched-bench, built from the newest
source on PyPI with native flags) on the same GGUF, the same rendered chats, the same max
tokens and threads. For each model, three comparisons:

- the job: N few-shot chats, greedy, all queued at once; kdpipe's batched engine (BATCH
  sequences decoded together) against `llama-server --parallel BATCH` with continuous
  batching, flash attention on and off; token counts from each engine's own counts
  (llama.cpp's `usage` and `timings`);
- raw speed, llama-batched-bench's method: BATCH distinct prompts of NPP tokens, then NTG
  decode steps of all of them together (and of one sequence alone);
- one stream, one request at a time: kdpipe's mistralrs engine against `llama-server
  --parallel 1`.

Every side runs --reps times, interleaved, on a quiet machine (harness.py).
"""
import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import harness

p = argparse.ArgumentParser()
p.add_argument("--bin", required=True, help="kdpipe's teacher_bench example")
p.add_argument("--llama-bin", required=True, help="folder with llama-server and llama-batched-bench")
p.add_argument("--llama-version", default="?", help="the llama-cpp-python version whose llama.cpp was built")
p.add_argument("--models", required=True, help="comma-separated GGUF paths")
p.add_argument("--config", default="configs/arith.toml", help="the task whose inputs and prompt make the chats")
p.add_argument("--n", type=int, default=48, help="chats in the job")
p.add_argument("--max-tokens", type=int, default=128)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--npp", type=int, default=256, help="prompt tokens a sequence in the raw comparison")
p.add_argument("--ntg", type=int, default=128, help="decode steps in the raw comparison")
p.add_argument("--no-one-stream", action="store_true", help="leave out the one-request-at-a-time rows")
p.add_argument(
    "--raw-only", action="store_true",
    help="only the raw-speed rows (no job, no one stream): a quicker check of the kernels; give another --out",
)
p.add_argument(
    "--no-one-stream-for", default="",
    help="comma-separated parts of model file names whose one-stream rows are left out (on a big model they take longest)",
)
p.add_argument("--out", default="bench-results/teacher.md")
p.add_argument("--work", required=True, help="a scratch folder")
harness.add_arguments(p)
a = p.parse_args()
threads = os.cpu_count()
bench = harness.Bench(a, "teacher bench")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=3600):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return None


def llama_server(model, chats, parallel, flash, sequential):
    """Start llama-server, send every chat (all at once, or one after another), stop it."""
    port = free_port()
    ctx_per_slot = max(c["prompt_tokens"] for c in chats) + a.max_tokens + 64
    cmd = [
        f"{a.llama_bin}/llama-server", "-m", model, "-t", str(threads), "-tb", str(threads),
        "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-cb", "-fa", flash,
        "--host", "127.0.0.1", "--port", str(port),
    ]
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"llama-server exited: {server.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        load_s = time.perf_counter() - start
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        job_start = time.perf_counter()

        def ask(chat):
            asked = time.perf_counter()
            r = post(url, {"messages": chat["messages"], "max_tokens": a.max_tokens, "temperature": 0.0})
            return r, time.perf_counter() - asked

        if sequential:
            replies = [ask(c) for c in chats]
        else:
            with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
                replies = list(pool.map(ask, chats))
        job_s = time.perf_counter() - job_start
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait()
    usage = [r["usage"] for r, _ in replies]
    timings = [r["timings"] for r, _ in replies]
    completion = sum(u["completion_tokens"] for u in usage)
    metrics = {
        "requests": len(replies),
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "prompt_evaluated": sum(t["prompt_n"] for t in timings),
        "completion_tokens": completion,
        "load_s": load_s,
        "job_s": job_s,
        "generated_tok_s": completion / job_s,
        "mean_latency_s": statistics.mean(l for _, l in replies),
        "peak_rss_mb": rss,
    }
    if sequential:
        metrics["prompt_tok_s"] = metrics["prompt_tokens"] / (sum(t["prompt_ms"] for t in timings) / 1000)
        metrics["decode_tok_s"] = sum(t["predicted_n"] for t in timings) / (sum(t["predicted_ms"] for t in timings) / 1000)
    return metrics


def batched_bench_parse(lines):
    by_pl = {l["pl"]: l for l in lines}
    return {
        "speed_pp": by_pl[a.batch]["speed_pp"],
        "speed_tg": by_pl[a.batch]["speed_tg"],
        "speed_tg_1": by_pl[1]["speed_tg"],
    }


def batched_bench_cmd(model, flash):
    return [
        f"{a.llama_bin}/llama-batched-bench", "-m", model, "-t", str(threads), "-tb", str(threads),
        "-c", str(a.batch * (a.npp + a.ntg)), "-b", "2048", "-ub", "512", "-fa", flash,
        "-npp", str(a.npp), "-ntg", str(a.ntg), "-npl", f"1,{a.batch}", "--output-format", "jsonl",
    ]


def write_table(sections, still_to_run):
    """The table so far: written after every model, so a long run that stops keeps the
    models it finished."""
    head = [
        "# Teacher speed: kdpipe's local engines vs llama.cpp"
        + (" (raw speed only: `--raw-only`)\n" if a.raw_only else "\n"),
        f"{threads} threads on {threads} cores ({os.uname().machine}), llama.cpp from llama-cpp-python {a.llama_version}'s "
        "vendored source (native flags, OpenMP), kdpipe's batched engine on the GGUF's block formats (`kernels::quant`; before 2026-12-02: f32 weights dequantized from the GGUF). "
        f"{a.reps} runs a side, interleaved.\n",
        f"CPU: {harness.cpu_description()}.\n",
        "Command: `scripts/bench/teacher.sh" + harness.command_args() + "`\n",
        harness.median_range_header() + "\n",
        "kdpipe's engine computes the few-shot prefix that consecutive prompts share once and copies it; "
        "llama-server reuses a slot's own previous prompt (`cache_prompt`), so its evaluated prompt tokens are shown.\n",
    ]
    if still_to_run:
        head.append(f"**Partial: still to run: {', '.join(still_to_run)}.**\n")
    bench.write(a.out, "\n".join(head + sections + ["", bench.load_note(), ""]))


def best(sides, metric):
    """The side with the highest median of metric: llama.cpp's faster flash-attention setting."""
    return max(sides, key=lambda s: statistics.median(bench.values(s, metric)))


def job_section(k, chats, prompt_tokens):
    """The job table and the ratio against llama-server's faster flash-attention setting."""
    server_best = best([f"{k}llama-server fa on", f"{k}llama-server fa off"], "generated_tok_s")
    s = [
        f"**The job**: {len(chats)} chats of `{a.config}` ({prompt_tokens} prompt tokens as kdpipe counts them), "
        f"greedy, at most {a.max_tokens} tokens, all queued at once; batch {a.batch} on both sides.\n"
    ]
    s.append("| engine | load s | job s | generated tok/s of the job | mean latency s | prompt tokens evaluated | peak RSS MiB |")
    s.append("|---|---:|---:|---:|---:|---:|---:|")
    for side, label in [
        (f"{k}kdpipe batched", f"kdpipe batched engine, batch {a.batch}"),
        (f"{k}llama-server fa on", f"llama-server --parallel {a.batch}, flash attention on"),
        (f"{k}llama-server fa off", f"llama-server --parallel {a.batch}, flash attention off"),
    ]:
        evaluated = bench.cell(side, "prompt_evaluated", 0) if "llama" in side else "(prefix shared: see note)"
        s.append(
            f"| {label} | {bench.cell(side, 'load_s', 2)} | {bench.cell(side, 'job_s')} | {bench.cell(side, 'generated_tok_s')} | "
            f"{bench.cell(side, 'mean_latency_s')} | {evaluated} | {bench.cell(side, 'peak_rss_mb', 0)} |"
        )
    ks = f"{k}kdpipe batched"
    s.append(
        f"\nkdpipe / llama-server ({server_best.split('server ')[1]}): generated tok/s "
        f"{bench.ratio(ks, server_best, 'generated_tok_s')}, mean latency "
        f"{bench.ratio(ks, server_best, 'mean_latency_s', higher_is_better=False)} (higher is better: "
        f"llama.cpp's latency over kdpipe's), peak RSS {bench.ratio(ks, server_best, 'peak_rss_mb', higher_is_better=False)} "
        f"(llama.cpp's over kdpipe's; below 1 means kdpipe uses more).\n"
    )
    return s


models = a.models.split(",")
sections = []
for done, model in enumerate(models, 1):
    name = os.path.basename(model).removesuffix(".gguf")
    chats_path = os.path.join(a.work, f"{name}.chats.jsonl")
    subprocess.run([a.bin, "chats", a.config, model, str(a.n), chats_path], check=True, stdout=subprocess.DEVNULL)
    chats = [json.loads(l) for l in open(chats_path)]
    k = f"{name}:"
    one_stream = not a.raw_only and not a.no_one_stream and not any(
        part and part in name for part in a.no_one_stream_for.split(",")
    )
    for rep in range(a.reps):
        if not a.raw_only:
            bench.run(f"{k}kdpipe batched", rep, [a.bin, "batched", model, chats_path, str(a.max_tokens), str(a.batch)])
            for flash in ("on", "off"):
                bench.before_run(f"{k}llama-server fa {flash}", rep)
                bench.record(f"{k}llama-server fa {flash}", llama_server(model, chats, a.batch, flash, sequential=False))
        # The raw rows run the weights as the engine serves them: in their GGUF block formats.
        bench.run(f"{k}kdpipe raw {a.batch}", rep, [a.bin, "raw-quantized", model, str(a.npp), str(a.ntg), str(a.batch)])
        bench.run(f"{k}kdpipe raw 1", rep, [a.bin, "raw-quantized", model, str(a.npp), str(a.ntg), "1"])
        for flash in ("on", "off"):
            bench.run(f"{k}llama-batched-bench fa {flash}", rep, batched_bench_cmd(model, flash), parse=batched_bench_parse)
        if one_stream:
            bench.run(f"{k}kdpipe mistralrs", rep, [a.bin, "mistralrs", model, chats_path, str(a.max_tokens)])
            bench.before_run(f"{k}llama-server np 1", rep)
            bench.record(f"{k}llama-server np 1", llama_server(model, chats, 1, "auto", sequential=True))

    # kdpipe against llama.cpp's faster flash-attention setting for each comparison.
    bb_sides = [f"{k}llama-batched-bench fa on", f"{k}llama-batched-bench fa off"]
    bb_best = best(bb_sides, "speed_tg")
    bb_best_pp = best(bb_sides, "speed_pp")
    bb_best_1 = best(bb_sides, "speed_tg_1")
    prompt_tokens = sum(c["prompt_tokens"] for c in chats)
    size_mb = os.path.getsize(model) / 2**20
    s = [f"## {name} ({size_mb:.0f} MB GGUF)\n"]
    if not a.raw_only:
        s += job_section(k, chats, prompt_tokens)
    s.append(
        f"**Raw speed**, llama-batched-bench's method: {a.batch} distinct prompts of {a.npp} tokens, then {a.ntg} "
        "decode steps of all of them together, and of one sequence alone.\n"
    )
    s.append(f"| engine | prompt tok/s ({a.batch} × {a.npp}) | decode tok/s, batch {a.batch} | decode tok/s, batch 1 | peak RSS MiB |")
    s.append("|---|---:|---:|---:|---:|")
    s.append(
        f"| kdpipe batched engine | {bench.cell(f'{k}kdpipe raw {a.batch}', 'speed_pp')} | "
        f"{bench.cell(f'{k}kdpipe raw {a.batch}', 'speed_tg')} | {bench.cell(f'{k}kdpipe raw 1', 'speed_tg')} | "
        f"{bench.cell(f'{k}kdpipe raw {a.batch}', 'peak_rss_mb', 0)} |"
    )
    for flash in ("on", "off"):
        side = f"{k}llama-batched-bench fa {flash}"
        s.append(
            f"| llama-batched-bench, flash attention {flash} | {bench.cell(side, 'speed_pp')} | {bench.cell(side, 'speed_tg')} | "
            f"{bench.cell(side, 'speed_tg_1')} | {bench.cell(side, 'peak_rss_mb', 0)} |"
        )
    # The ratio compares values under one metric name: kdpipe's batch-1 run's decode speed.
    for r in bench.results[f"{k}kdpipe raw 1"]:
        r["speed_tg_1"] = r["speed_tg"]
    s.append(
        f"\nkdpipe / llama-batched-bench, each against its faster flash-attention setting: prompt "
        f"{bench.ratio(f'{k}kdpipe raw {a.batch}', bb_best_pp, 'speed_pp')} ({bb_best_pp.split('bench ')[1]}), "
        f"decode ({bb_best.split('bench ')[1]}) at batch {a.batch} "
        f"{bench.ratio(f'{k}kdpipe raw {a.batch}', bb_best, 'speed_tg')}, decode ({bb_best_1.split('bench ')[1]}) at batch 1 "
        f"{bench.ratio(f'{k}kdpipe raw 1', bb_best_1, 'speed_tg_1')}.\n"
    )
    if one_stream:
        s.append("**One stream**: one request at a time, the same chats (both engines reuse the previous prompt's cached prefix).\n")
        s.append("| engine | prompt tok/s | decode tok/s | generated tok/s of the job | job s | peak RSS MiB |")
        s.append("|---|---:|---:|---:|---:|---:|")
        for side, label in [
            (f"{k}kdpipe mistralrs", "kdpipe, mistralrs 0.8.1 engine"),
            (f"{k}llama-server np 1", "llama-server --parallel 1"),
        ]:
            s.append(
                f"| {label} | {bench.cell(side, 'prompt_tok_s')} | {bench.cell(side, 'decode_tok_s')} | "
                f"{bench.cell(side, 'generated_tok_s')} | {bench.cell(side, 'job_s')} | {bench.cell(side, 'peak_rss_mb', 0)} |"
            )
        s.append(
            f"\nkdpipe mistralrs / llama-server --parallel 1: generated tok/s "
            f"{bench.ratio(f'{k}kdpipe mistralrs', f'{k}llama-server np 1', 'generated_tok_s')}.\n"
        )
    else:
        s.append("**One stream**: left out for this model (`--no-one-stream`/`--no-one-stream-for`).\n")
    sections.append("\n".join(s))
    write_table(sections, [os.path.basename(m) for m in models[done:]])

