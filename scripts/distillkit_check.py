"""Reads data written by `kdpipe export-data --format distillkit` the way DistillKit does,
and trains one step on it.

    python distillkit_check.py DATA_DIR MODEL_DIR

Loads DATA_DIR with `datasets.load_dataset` (the Parquet files by split name, as a
DistillKit `repo_id` pointing at a folder does), stacks a batch into tensors as
DistillKit's `prepacked` collator does (`torch.tensor` of every column), and runs one
optimizer step of DistillKit's default loss mix (0.5 × the model's cross-entropy + 0.5 ×
forward KL from the sparse teacher top-k, missing mass as zero, counted where labels ≥ 0)
on the model in MODEL_DIR, on CPU. Prints one JSON line: each split's KD positions (row,
position, next token, top-k ids and log-probabilities, for a round trip), the tensor
shapes, and the loss before and after the step on the same batch.
"""
import json
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM

data_dir, model_dir = sys.argv[1:3]
data = load_dataset(data_dir)
out = {"splits": sorted(data.keys()), "positions": {}, "shapes": {}}
for split, ds in data.items():
    batch = {key: torch.tensor([row[key] for row in ds]) for key in ds.column_names}
    out["shapes"][split] = {key: list(t.shape) for key, t in batch.items()}
    positions = []
    for r in range(batch["input_ids"].shape[0]):
        for p in torch.nonzero(batch["labels"][r] >= 0).flatten().tolist():
            positions.append({"row": r, "position": p, "next": batch["input_ids"][r, p + 1].item(),
                              "ids": batch["token_ids"][r, p].tolist(),
                              "logprobs": batch["top_values"][r, p].tolist()})
    out["positions"][split] = positions


def loss_of(model, batch):
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    logprobs = torch.log_softmax(outputs.logits.float(), dim=-1)
    student = logprobs.gather(-1, batch["token_ids"])
    teacher = batch["top_values"].float()
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    mask = (batch["labels"] >= 0).float()
    return 0.5 * outputs.loss + 0.5 * (kl * mask).sum() / mask.sum()


torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
train = data["train"].select(range(min(4, len(data["train"]))))
batch = {key: torch.tensor([row[key] for row in train]) for key in train.column_names}
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
before = loss_of(model, batch)
before.backward()
optimizer.step()
with torch.no_grad():
    after = loss_of(model, batch)
out["loss_before"] = before.item()
out["loss_after"] = after.item()
print(json.dumps(out))
