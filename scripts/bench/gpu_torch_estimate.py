"""What kdpipe's teacher and student work would cost on one GPU, measured with PyTorch.

kdpipe's own engine and trainer run on CPU (and candle's CUDA build, which this script does
not need); a team with a GPU would run the teacher on vLLM or transformers and hand big
students to TRL (`kdpipe export-data`). This script times that work on the GPU it runs on,
with the shapes of the models kdpipe's benchmarks use (Qwen2.5-Coder-1.5B teacher,
Qwen2.5-Coder-0.5B and SmolLM2-135M students, their configs as their GGUF metadata gives
them; the Qwen files carry an output head of their own, untied) and the token counts of
kdpipe's real few-shot jobs (docs/SCALE.md: 263 prompt and ~31 completion tokens an input
for SVAMP-like numeric tasks, 229 and ~12 for labels).

Weights are random: the arithmetic and memory traffic of a forward pass do not depend on
their values, so the figures are those of the real models' shapes (no end-of-sequence
token is set: every reply runs to its full length). transformers' `generate` is a lower
bound on what a serving engine (vLLM, continuous batching, paged attention) reaches on the
same GPU.

    [BATCHES="64 256 1024 4096"] python3 scripts/bench/gpu_torch_estimate.py [OUT.json]

Prints a table (median and range of REPS timed runs after a warm-up) and writes JSON.
"""

import json
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPS = 3


def qwen_coder(hidden, intermediate, layers, heads):
    """A Qwen2.5-Coder size: the family's vocabulary, 2 key-value heads and rope base, and
    an output head of its own (the GGUF files carry one)."""
    return (
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    )


MODELS = {
    "Qwen2.5-Coder-1.5B": qwen_coder(1536, 8960, 28, 12),
    "Qwen2.5-Coder-0.5B": qwen_coder(896, 4864, 24, 14),
    "SmolLM2-135M": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_theta=1e5,
            tie_word_embeddings=True,
        ),
    ),
}

# (task kind, prompt tokens, completion tokens) from kdpipe's generate manifests.
JOBS = [("numeric", 263, 31), ("labels", 229, 12)]
BATCHES = [int(b) for b in os.environ.get("BATCHES", "64 256 1024 4096").split()]


def timed(fn):
    """Median, min and max seconds of REPS runs of fn after one warm-up."""
    fn()
    torch.cuda.synchronize()
    secs = []
    for _ in range(REPS):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    return statistics.median(secs), min(secs), max(secs)


def build(name, dtype):
    cls, cfg = MODELS[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(cfg)
    return model.to(dtype)


def teacher_rows(results):
    model = build("Qwen2.5-Coder-1.5B", torch.bfloat16).eval()
    vocab = model.config.vocab_size
    for kind, prompt, completion in JOBS:
        for batch in BATCHES:
            ids = torch.randint(100, vocab - 100, (batch, prompt), device="cuda")
            mask = torch.ones_like(ids)

            def run():
                with torch.no_grad():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=completion,
                        do_sample=False,
                        pad_token_id=0,
                        eos_token_id=None,
                    )
                assert out.shape == (batch, prompt + completion), out.shape

            med, lo, hi = timed(run)
            row = {
                "what": "teacher generate",
                "model": "Qwen2.5-Coder-1.5B",
                "task": kind,
                "batch": batch,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "seconds": [med, lo, hi],
                "inputs_per_s": batch / med,
                "completion_tok_per_s": batch * completion / med,
            }
            row["attention"] = model.config._attn_implementation
            results.append(row)
            print(
                f"| teacher 1.5B generate | {kind} {prompt}+{completion} tok | batch {batch} | "
                f"{med:.3f} s ({lo:.3f}–{hi:.3f}) | {batch / med:,.0f} inputs/s | "
                f"{batch * completion / med:,.0f} completion tok/s |",
                flush=True,
            )
    del model
    torch.cuda.empty_cache()


def student_rows(results):
    seq = 263 + 31
    for name, batch in [("SmolLM2-135M", 64), ("Qwen2.5-Coder-0.5B", 32)]:
        model = build(name, torch.float32).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        vocab = model.config.vocab_size
        ids = torch.randint(100, vocab - 100, (batch, seq), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        med, lo, hi = timed(step)
        row = {
            "what": "student train step (AdamW, bf16 autocast, f32 weights)",
            "model": name,
            "batch": batch,
            "seq": seq,
            "seconds": [med, lo, hi],
            "tokens_per_s": batch * seq / med,
        }
        results.append(row)
        print(
            f"| student train step | {name} | batch {batch} × {seq} tok | "
            f"{med:.3f} s ({lo:.3f}–{hi:.3f}) | {batch * seq / med:,.0f} tok/s |",
            flush=True,
        )
        del model, opt
        torch.cuda.empty_cache()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else None
    import transformers

    env = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reps": REPS,
    }
    print(json.dumps(env), flush=True)
    results = []
    for section in (teacher_rows, student_rows):
        try:
            section(results)
        except Exception as e:  # one failed section still leaves the other's figures
            print(f"{section.__name__} failed: {e!r}", flush=True)
            results.append({"what": section.__name__, "error": repr(e)})
    if out:
        with open(out, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
