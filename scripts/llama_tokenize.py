"""llama.cpp's tokenization (llama-cpp-python) of texts, for the GGUF tokenizer test.

    python llama_tokenize.py MODEL.gguf < request.json
The request: {"texts": ["...", ...]}. Each text is tokenized as llama.cpp tokenizes a
prompt: special tokens written in the text are parsed as such, no BOS added. Prints a JSON
list: each text's token ids.
"""
import json
import sys

from llama_cpp import Llama

request = json.load(sys.stdin)
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
out = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in request["texts"]]
print(json.dumps(out))
