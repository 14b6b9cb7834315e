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
# (GGML_TYPE_F32): an f32 KV cache, the closer reference to exact arithmetic. kdpipe's engine
# keeps f16 keys and values but computes in f32; llama.cpp's f16 cache (its default) also
# rounds queries and attention weights to f16, and agreed less (Qwen2.5-Coder-0.5B: 759 of
# 768 positions against 761 with f32; SmolLM2: 741 against 752).
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
