"""PyTorch + transformers side of scripts/bench/train.sh: the same SmolLM2 weights (an HF
folder kdpipe exported), the same random ids, AdamW, gradient clipping at 1.0; `full`
trains every weight, `lora` rank-16 adapters (alpha 32) on every linear layer of the blocks,
written here in a few lines (no peft). `f32`, or `bf16`: CPU autocast to bfloat16 around
the forward pass and the loss, f32 master weights (PyTorch's mixed precision on a CPU).
One warm-up step, then STEPS timed. One JSON line.

    python torch_train_bench.py MODEL_DIR full|lora f32|bf16 BATCH SEQ STEPS THREADS
"""
import contextlib
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, mode, precision, b, t, steps, threads = *sys.argv[1:4], *map(int, sys.argv[4:8])
assert precision in ("f32", "bf16"), precision
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.train()


class LoraLinear(torch.nn.Module):
    def __init__(self, base, r=16, alpha=32):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.a = torch.nn.Parameter(torch.empty(r, base.in_features).uniform_(-base.in_features ** -0.5, base.in_features ** -0.5))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


if mode == "lora":
    for p in model.parameters():
        p.requires_grad_(False)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoraLinear(getattr(parent, name)))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
ids = (torch.arange(b * t) * 7919 % 49152).reshape(b, t)
timed = 0.0
for step in range(steps + 1):
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step > 0:
        timed += time.perf_counter() - start
print(json.dumps({"engine": f"PyTorch {torch.__version__} + transformers", "mode": mode, "precision": precision, "tokens_per_s": round(b * t * steps / timed, 1)}))
