"""Logits of an exported student in Hugging Face transformers, for the round-trip test.

    python hf_logits.py STUDENT_DIR < ids.json    (a JSON list of token ids)
Prints a JSON object: the logits of every position (float32, as lists) and the token ids
that the student's own tokenizer.json gives for a probe text.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1]
request = json.load(sys.stdin)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
with torch.no_grad():
    logits = model(torch.tensor([request["ids"]])).logits[0]
print(json.dumps({
    "logits": logits.tolist(),
    "probe_ids": tokenizer(request["probe"], add_special_tokens=False)["input_ids"],
    "chat": tokenizer.apply_chat_template([{"role": "user", "content": request["probe"]}], tokenize=False, add_generation_prompt=True),
}))
