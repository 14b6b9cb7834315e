"""One TRL training step on data written by `kdpipe export-data --format trl`.

    python trl_step.py DATA_DIR MODEL_DIR OUT_DIR
Loads DATA_DIR/train.jsonl with the `datasets` JSON loader, keeps the label and rationale
views (the teacher view is for a token-level KD loss TRL does not have), and runs one
SFTTrainer step (prompt / completion: loss on the completion only) on CPU with the model
in MODEL_DIR. Prints the trainer's log lines and, last, a JSON line with the step's
training loss, the rows loaded and the views seen.
"""
import json
import sys

from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

data_dir, model_dir, out_dir = sys.argv[1:4]
data = load_dataset("json", data_files={"train": f"{data_dir}/train.jsonl"})["train"]
views = sorted(set(data["view"]))
train = data.filter(lambda r: r["view"] != "teacher")
config = SFTConfig(
    output_dir=out_dir,
    max_steps=1,
    per_device_train_batch_size=4,
    learning_rate=1e-5,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    max_length=256,
)
trainer = SFTTrainer(model=model_dir, train_dataset=train, args=config)
result = trainer.train()
print(json.dumps({"loss": result.training_loss, "rows": len(data), "trained_rows": len(train),
                  "views": views}))
