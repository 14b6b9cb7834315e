"""llama.cpp (llama-cpp-python) on the chats kdpipe's teacher bench sent: greedy, one
request at a time, the same max_tokens. Both engines reuse the cached prefix of the
previous prompt (the few-shot examples). Prompt time is the time to the first streamed
token (the prompt pass yields it), decode time the rest. Prints one JSON line.

    python llama_cpp_bench.py MODEL CHATS_JSONL MAX_TOKENS THREADS
"""
import json
import sys
import time

import llama_cpp

model, chats_path, max_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
load_start = time.perf_counter()
llm = llama_cpp.Llama(model_path=model, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - load_start
chats = [json.loads(line) for line in open(chats_path)]
prompt_tokens = prompt_s = decode_tokens = decode_s = 0
wall = time.perf_counter() - load_s
for chat in chats:
    start = time.perf_counter()
    first = None
    n = 0
    for chunk in llm.create_chat_completion(
        messages=chat["messages"], max_tokens=max_tokens, temperature=0.0, stream=True
    ):
        delta = chunk["choices"][0].get("delta", {})
        if delta.get("content"):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    # The same chat through the same GGUF template: kdpipe's count of its prompt tokens.
    prompt_tokens += chat["prompt_tokens"]
    prompt_s += first - start
    decode_tokens += max(n - 1, 0)
    decode_s += end - first
print(json.dumps({
    "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
    "requests": len(chats),
    "prompt_tokens": prompt_tokens,
    "prompt_tok_s": round(prompt_tokens / max(prompt_s, 1e-9), 1),
    "decode_tokens": decode_tokens,
    "decode_tok_s": round(decode_tokens / max(decode_s, 1e-9), 1),
    "wall_s": round(time.perf_counter() - wall, 1),
    # Every request's first token comes out of the prompt pass.
    "generated_tok_s_wall": round((decode_tokens + len(chats)) / (time.perf_counter() - wall), 1),
}))
