"""PyTorch + transformers side of scripts/bench/train.sh, set up the way a PyTorch user at
their best would: the same SmolLM2 weights (an HF folder kdpipe exported), the same token
ids, `use_cache=False`, SDPA attention, AdamW with `fused=True`, gradient clipping at 1.0;
`full` trains every weight, `lora` uses PEFT (rank 16, alpha 32, dropout 0, every linear
layer of the blocks: the targets kdpipe uses). `f32`, or `bf16`: CPU autocast to bfloat16
around the forward pass and the loss, f32 master weights (PyTorch's mixed precision on a
CPU). `--compile` wraps the model in torch.compile (its compilation falls in the warm-up
steps). The allocator is whatever LD_PRELOAD gives (train.py picks the fastest).

    python torch_train_bench.py MODEL_DIR full|lora f32|bf16 BATCH SEQ WARMUP STEPS THREADS
        [--compile] [--config-out FILE]

Prints one JSON line: tokens/s over the timed steps and the median step.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("mode", choices=["full", "lora"])
p.add_argument("precision", choices=["f32", "bf16"])
p.add_argument("batch", type=int)
p.add_argument("seq", type=int)
p.add_argument("warmup", type=int)
p.add_argument("steps", type=int)
p.add_argument("threads", type=int)
p.add_argument("--compile", action="store_true")
p.add_argument("--config-out", help="write torch.__config__.show() and parallel_info() here")
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.config_out:
    with open(a.config_out, "w") as f:
        f.write(torch.__config__.show())
        f.write(torch.__config__.parallel_info())
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa")
model.config.use_cache = False
model.train()
if a.mode == "lora":
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, bias="none"))
attn = getattr(model.config, "_attn_implementation", "unknown")
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
step_fn = model
if a.compile:
    step_fn = torch.compile(model)
b, t = a.batch, a.seq
ids = (torch.arange(b * t) * 7919 % 49152).reshape(b, t)
times = []
for step in range(a.warmup + a.steps):
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()
    with autocast:
        out = step_fn(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step >= a.warmup:
        times.append(time.perf_counter() - start)
preload = os.path.basename(os.environ.get("LD_PRELOAD", "")) or "glibc malloc"
print(
    json.dumps(
        {
            "engine": f"PyTorch {torch.__version__} + transformers"
            + (" + PEFT" if a.mode == "lora" else "")
            + (" + torch.compile" if a.compile else ""),
            "attention": attn,
            "allocator": preload,
            "mode": a.mode,
            "precision": a.precision,
            "tokens_per_s": round(b * t * len(times) / sum(times), 1),
            "step_s": round(statistics.median(times), 3),
            "loss": round(out.loss.item(), 4),
        }
    )
)
