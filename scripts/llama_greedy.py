"""Greedy continuations from llama.cpp (llama-cpp-python) for the agreement test.

    python llama_greedy.py MODEL.gguf < request.json
The request: {"prompts": [[token ids], ...], "max_new": N, "stop": [token ids]}. Each
prompt is evaluated as given (no tokenization, no special tokens added), then extended
one token at a time by the argmax of llama.cpp's logits, up to N tokens or a stop token
(kept). Prints a JSON list: each prompt's continuation ids.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

request = json.load(sys.stdin)
longest = max(len(p) for p in request["prompts"]) + request["max_new"]
# logits_all: llama-cpp-python keeps `scores` (the logits) only with it. type_k/type_v 0
# (GGML_TYPE_F32): an f32 KV cache, as kdpipe's engine keeps (llama.cpp's default is f16).
llm = Llama(
    model_path=sys.argv[1],
    n_ctx=longest + 8,
    n_threads=2,
    n_batch=512,
    logits_all=True,
    type_k=0,
    type_v=0,
    verbose=False,
)
stop = set(request["stop"])
out = []
for prompt in request["prompts"]:
    llm.reset()
    llm.eval(prompt)
    continuation = []
    while len(continuation) < request["max_new"]:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        continuation.append(token)
        if token in stop:
            break
        llm.eval([token])
    out.append(continuation)
print(json.dumps(out))
