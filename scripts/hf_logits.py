"""Logits of an exported student in Hugging Face transformers, for the round-trip test.

    python hf_logits.py STUDENT_DIR [BASE_DIR ADAPTER_DIR] < request.json
The request: {"ids": [token ids], "probe": text}. Prints a JSON object: the logits of
every position (float32, as lists), the token ids that the student's own tokenizer.json
gives for the probe, and its chat template's rendering; with BASE_DIR and ADAPTER_DIR,
also the logits of the base model with the PEFT adapter loaded on it (adapter_logits).
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
out = {}
if len(sys.argv) > 3:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, sys.argv[3])
    adapted.eval()
    with torch.no_grad():
        out["adapter_logits"] = adapted(torch.tensor([request["ids"]])).logits[0].tolist()
print(json.dumps({
    **out,
    "logits": logits.tolist(),
    "probe_ids": tokenizer(request["probe"], add_special_tokens=False)["input_ids"],
    "chat": tokenizer.apply_chat_template([{"role": "user", "content": request["probe"]}], tokenize=False, add_generation_prompt=True),
}))
