"""Writes the bad-input corpus: files/ and cases.toml, read by tests/bad_corpus.rs.

Run with a Python that has polars (the Parquet cases):
    ~/.cache/kdpipe/bench-venv/bin/python tests/bad-inputs/make.py

Each case names the command to run, which broken file goes where, and what the error must
say (the file, row or field, and what to do). The harness writes a valid config and valid
files for everything the case does not break.
"""

import json
import os
import struct

import polars as pl

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = os.path.join(HERE, "files")
os.makedirs(FILES, exist_ok=True)
cases = []


def put(name, data):
    path = os.path.join(FILES, name)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return f"files/{name}"


def case(name, command, expect, **kw):
    cases.append(dict(name=name, command=command, expect=expect, **kw))


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


ok1 = {"id": "1", "q": "Tom has 2 apples and buys 3. How many?", "a": 5}
ok2 = {"id": "2", "q": "A box holds 4 pens. How many in 3 boxes?", "a": 12}

# --- input files (generate reads them before it opens the teacher) ---
inputs = [
    ("broken-line", "jsonl", jsonl(ok1) + '{"id": "2", "q": oops}\n', ["broken-line.jsonl:2", "malformed JSON"]),
    ("not-an-object", "jsonl", jsonl(ok1) + "[1, 2, 3]\n", ["not-an-object.jsonl:2", "JSON object"]),
    ("missing-input-field", "jsonl", jsonl(ok1, {"id": "2", "question": "x", "a": 1}), ["missing-input-field.jsonl:2", 'missing field "q"', "input_field"]),
    ("input-is-object", "jsonl", jsonl(ok1, {"id": "2", "q": {"text": "x"}, "a": 1}), ["input-is-object.jsonl:2", '"q"', "string or a number"]),
    ("input-is-null", "jsonl", jsonl(ok1, {"id": "2", "q": None, "a": 1}), ["input-is-null.jsonl:2", '"q"']),
    ("input-is-empty", "jsonl", jsonl(ok1, {"id": "2", "q": "   ", "a": 1}), ["input-is-empty.jsonl:2", '"q"', "empty"]),
    ("empty-file", "jsonl", "", ["no input rows", "empty-file.jsonl"]),
    ("blank-lines-only", "jsonl", "\n\n  \n", ["no input rows", "blank-lines-only.jsonl"]),
    ("invalid-utf8", "jsonl", jsonl(ok1).encode() + b'{"id": "2", "q": "caf\xe9", "a": 1}\n', ["invalid-utf8.jsonl:2", "UTF-8"]),
    ("duplicate-ids", "jsonl", jsonl(ok1, ok2, ok1), ['duplicate id "1"', "duplicate-ids.jsonl:3", "duplicate-ids.jsonl:1"]),
    ("id-is-array", "jsonl", jsonl(ok1, {"id": [2], "q": "x", "a": 1}), ["id-is-array.jsonl:2", '"id"']),
    ("missing-id", "jsonl", jsonl(ok1, {"q": "x", "a": 1}), ["missing-id.jsonl:2", 'id field "id"']),
    ("missing-gold", "jsonl", jsonl(ok1, {"id": "2", "q": "x"}), ["missing-gold.jsonl:2", 'gold field "a"', "gold_field"]),
    ("truncated-last-line", "jsonl", jsonl(ok1) + '{"id": "2", "q": "How ma', ["truncated-last-line.jsonl:2", "malformed JSON"]),
    ("huge-row", "jsonl", jsonl(ok1, {"id": "2", "q": "word " * 60000, "a": 1}), ["huge-row.jsonl:2", "300000 characters", "max_input_chars"]),
    ("unknown-extension", "txt", "Tom has 2 apples\n", ["unknown-extension.txt", ".jsonl, .parquet or .csv"]),
    ("csv-missing-column", "csv", "id,question,a\n1,hi,2\n", ["csv-missing-column.csv", 'missing column "q"']),
    ("csv-ragged", "csv", "id,q,a\n1,hi,2\n2,there,3,extra,fields\n", ["csv-ragged.csv", "cannot read"]),
    ("csv-header-only", "csv", "id,q,a\n", ["no input rows", "csv-header-only.csv"]),
    ("csv-null-input", "csv", "id,q,a\n1,hi,2\n2,,3\n", ["csv-null-input.csv row 2", '"q"']),
    ("parquet-garbage", "parquet", b"PAR1 this is not a parquet file at all", ["parquet-garbage.parquet", "cannot read"]),
]
for name, ext, data, expect in inputs:
    case(name, "generate", expect, input=put(f"{name}.{ext}", data))

df = pl.DataFrame({"id": ["1", "2"], "q": ["hi", "there"], "a": [1, 2]})
df.write_parquet(os.path.join(FILES, "valid-input.parquet"))
raw = open(os.path.join(FILES, "valid-input.parquet"), "rb").read()
os.remove(os.path.join(FILES, "valid-input.parquet"))
case("parquet-truncated", "generate", ["parquet-truncated.parquet", "cannot read"], input=put("parquet-truncated.parquet", raw[: len(raw) // 2]))
case("parquet-empty-file", "generate", ["parquet-empty-file.parquet", "cannot read"], input=put("parquet-empty-file.parquet", b""))
pl.DataFrame({"id": ["1"], "q": [[1, 2]], "a": [1]}).write_parquet(os.path.join(FILES, "parquet-input-is-list.parquet"))
case("parquet-input-is-list", "generate", ["parquet-input-is-list.parquet", '"q"', "as text"], input="files/parquet-input-is-list.parquet")

# --- teacher rows (curate reads runs/t/generate/) ---
TEACHER = "runs/t/generate/teacher-00000-of-00001.parquet"


def teacher_frame(n=3):
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "sample": pl.Series([0] * n, dtype=pl.UInt32),
            "input": [f"question {i}" for i in range(n)],
            "answer": ["1"] * n,
        }
    )


for name, data, expect in [
    ("teacher-garbage", b"not parquet", ["teacher-00000-of-00001.parquet", "not a readable Parquet file"]),
    ("teacher-empty-file", b"", ["teacher-00000-of-00001.parquet", "not a readable Parquet file"]),
]:
    case(name, "curate", expect, setup="generate", place=[[put(f"{name}.parquet", data), TEACHER]])
teacher_frame().write_parquet(os.path.join(FILES, "teacher-missing-columns.parquet"))
case("teacher-missing-columns", "curate", ["teacher-00000-of-00001.parquet", "missing column"], setup="generate", place=[["files/teacher-missing-columns.parquet", TEACHER]])
raw = open(os.path.join(FILES, "teacher-missing-columns.parquet"), "rb").read()
case("teacher-truncated", "curate", ["teacher-00000-of-00001.parquet", "not a readable Parquet file"], setup="generate", place=[[put("teacher-truncated.parquet", raw[: len(raw) - 40]), TEACHER]])
case("generate-manifest-broken", "curate", ["runs/t/generate/manifest.json", "hint: re-run kdpipe generate"], setup="generate", place=[[put("generate-manifest-broken.json", '{"stage": "generate", "schema_vers'), "runs/t/generate/manifest.json"]])
case(
    "generate-manifest-future",
    "curate",
    ["schema version 99", "hint: re-run kdpipe generate"],
    setup="generate",
    place=[[put("generate-manifest-future.json", json.dumps({"kind": "generate", "schema_version": 99, "kdpipe_version": "9.9.9", "config_hash": "x", "seed": 0, "created_unix": 0, "inputs": [], "outputs": [], "summary": {}})), "runs/t/generate/manifest.json"]],
)

# --- curated splits (finetune and eval read runs/t/curate/) ---
case("train-garbage", "finetune", ["runs/t/curate/train.parquet", "not a readable Parquet file"], setup="curate", place=[[put("train-garbage.parquet", b"\x00\x01garbage"), "runs/t/curate/train.parquet"]])
pl.DataFrame({"id": ["a"], "input": ["x"]}).write_parquet(os.path.join(FILES, "train-missing-columns.parquet"))
case("train-missing-columns", "finetune", ["train.parquet", "missing column"], setup="curate", place=[["files/train-missing-columns.parquet", "runs/t/curate/train.parquet"]])
case("test-split-garbage", "eval", ["runs/t/curate/test.parquet", "not a readable Parquet file"], setup="curate", args=["--models", "base"], place=[[put("test-split-garbage.parquet", b"PAR1PAR1"), "runs/t/curate/test.parquet"]])
case("curate-manifest-missing", "finetune", ["runs/t/curate has no manifest.json", "kdpipe curate"], setup="curate", remove=["runs/t/curate/manifest.json"])

# --- eval files ---
for name, data, expect, kind in [
    ("eval-gold-not-a-number", jsonl({"id": "1", "q": "x", "a": "many"}), ["eval row \"1\"", '"many"', "a number"], "numeric"),
    ("eval-label-outside-set", jsonl({"id": "1", "q": "so happy", "a": "joy"}, {"id": "2", "q": "meh", "a": "boredom"}), ['eval row "2"', '"boredom"', "one of the labels"], "labels"),
    ("eval-missing-gold", jsonl({"id": "1", "q": "x"}), ["eval-missing-gold.jsonl:1", 'gold field "a"'], "numeric"),
    ("eval-broken-line", '{"id": "1", "q": \n', ["eval-broken-line.jsonl:1", "malformed JSON"], "numeric"),
]:
    case(name, "eval", expect, kind=kind, args=["--models", "base", "--file", put(f"{name}.jsonl", data)])

# --- configs ---
for name, text, expect in [
    ("config-unknown-key", "[finetune]\nepohcs = 3\n", ["unknown field `epohcs`"]),
    ("config-wrong-type", "[finetune]\nepochs = \"three\"\n", ["epochs", "invalid type"]),
    ("config-syntax-error", "[finetune\nepochs = 1\n", ["invalid config", "c.toml"]),
    ("config-unknown-section", "[trainer]\nepochs = 1\n", ["unknown field `trainer`"]),
    ("config-split-not-one", "[curate]\nsplit = [0.5, 0.1, 0.1]\n", ["[curate] split", "summing to 1"]),
    ("config-one-label", None, ["at least two labels"]),
    ("config-samples-zero", "[generate]\nsamples = 0\n", ["samples must be at least 1"]),
    ("config-samples-greedy", "[generate]\nsamples = 3\n", ["samples = 3", "temperature > 0"]),
    ("config-alpha-range", "[finetune]\nalpha = 1.5\n", ["alpha must be in [0, 1]"]),
    ("config-negative-lr", "[finetune]\nlearning_rate = -0.001\n", ["learning_rate", "greater than 0"]),
    ("config-zero-batch", "[finetune]\nbatch_size = 0\n", ["batch_size"]),
    ("config-bad-eval-split", "[eval]\nsplit = \"dev\"\n", ["[eval] split", "\"dev\""]),
    ("config-teacher-kind", "[teacher2]\n", ["unknown field `teacher2`"]),
    ("config-label-scores-numeric", "[eval]\nstudent_decode = \"label_scores\"\n", ["label_scores", "label task"]),
    ("config-bad-objective", "[finetune]\nobjective = \"magic\"\n", ["unknown variant `magic`", "step_by_step"]),
    ("config-negative-kd", "[finetune]\nkd_weight = -1.0\n", ["kd_weight"]),
    ("config-lora-rank-zero", "[finetune.lora]\nrank = 0\nalpha = 16.0\n", ["rank"]),
    ("config-max-seq-tiny", "[finetune]\nmax_seq_len = 4\n", ["max_seq_len"]),
    ("config-bad-device", "[finetune]\ndevice = \"gpu\"\n", ["[finetune] device", "cuda:N", "\"gpu\""]),
]:
    if text is None:
        case(name, "generate", expect, kind="labels_one")
    else:
        case(name, "generate", expect, config_extra=put(f"{name}.toml", text))
case("config-invalid-utf8", "generate", ["c.toml", "UTF-8"], config_file=put("config-invalid-utf8.toml", b'name = "caf\xe9"\n'))
case("config-empty", "generate", ["invalid config", "missing field `data`"], config_file=put("config-empty.toml", ""))
case("config-openai-no-url", "generate", ["base_url"], config_extra=put("config-openai-no-url.toml", "[generate]\nsamples = 1\n"), teacher_kind="openai")
case("config-missing-config", "generate", ["cannot read config", "nope.toml"], args_only=["generate", "--config", "nope.toml"])

# --- prompt templates ---
for name, text, expect in [
    ("prompt-no-front-matter", "Question: {{ input }}\n", ["prompt-no-front-matter.md", "+++"]),
    ("prompt-bad-toml", "+++\nsystem = \"unclosed\n+++\nQuestion: {{ input }}\n", ["prompt-bad-toml.md"]),
    ("prompt-no-input", "+++\nsystem = \"Solve it.\"\n+++\nQuestion: none\n", ["prompt-no-input.md", "{{ input }}"]),
]:
    case(name, "generate", expect, prompt=put(f"{name}.md", text))

# --- model files ---
gguf_head = b"GGUF" + struct.pack("<IQQ", 3, 291, 30)  # a header that promises 291 tensors
case("student-truncated-gguf", "finetune", ["student-truncated-gguf.gguf", "not a valid GGUF file"], setup="curate", student=put("student-truncated-gguf.gguf", gguf_head + b"\x00" * 50))
case("student-not-gguf", "finetune", ["student-not-gguf.gguf", "not a valid GGUF file"], setup="curate", student=put("student-not-gguf.gguf", b"<html>404 Not Found</html>"))
case("teacher-truncated-gguf", "generate", ["teacher-truncated-gguf.gguf"], teacher=put("teacher-truncated-gguf.gguf", gguf_head + b"\x00" * 50))
case("student-missing-file", "finetune", ["models/none.gguf", "fetch-models.sh"], setup="curate", student_path="models/none.gguf")

tiny = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
    "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32, "tie_word_embeddings": True,
    "eos_token_id": 0,
}


def safetensors(tensors):
    header, blobs, off = {}, b"", 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        blobs += b"\x00" * n
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blobs


def hf_dir(name, config, tensors, tokenizer=True):
    d = os.path.join(FILES, name)
    os.makedirs(d, exist_ok=True)
    if config is not None:
        open(os.path.join(d, "config.json"), "w").write(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        open(os.path.join(d, "model.safetensors"), "wb").write(safetensors(tensors))
    if tokenizer:
        tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"<eos>": 0, "a": 1}, "unk_token": "<eos>"},
               "pre_tokenizer": {"type": "Whitespace"}, "added_tokens": []}
        open(os.path.join(d, "tokenizer.json"), "w").write(json.dumps(tok))
        chat = {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "eos_token": "<eos>"}
        open(os.path.join(d, "tokenizer_config.json"), "w").write(json.dumps(chat))
    return f"files/{name}"


L = "model.layers.0"
good = {"model.embed_tokens.weight": [16, 8], "model.norm.weight": [8], f"{L}.input_layernorm.weight": [8],
        f"{L}.post_attention_layernorm.weight": [8], f"{L}.self_attn.q_proj.weight": [8, 8],
        f"{L}.self_attn.k_proj.weight": [4, 8], f"{L}.self_attn.v_proj.weight": [4, 8],
        f"{L}.self_attn.o_proj.weight": [8, 8], f"{L}.mlp.gate_proj.weight": [12, 8],
        f"{L}.mlp.up_proj.weight": [12, 8], f"{L}.mlp.down_proj.weight": [8, 12]}
wrong = dict(good, **{f"{L}.self_attn.q_proj.weight": [8, 4]})
case("student-wrong-shape", "finetune", ["student-wrong-shape", "q_proj.weight", "[8, 4]", "[8, 8]"], setup="curate", student=hf_dir("student-wrong-shape", tiny, wrong))
missing = {k: v for k, v in good.items() if "down_proj" not in k}
case("student-missing-tensor", "finetune", ["student-missing-tensor", "down_proj.weight", "missing tensor"], setup="curate", student=hf_dir("student-missing-tensor", tiny, missing))
case("student-no-config", "finetune", ["student-no-config", "config.json"], setup="curate", student=hf_dir("student-no-config", None, good))
case("student-config-broken", "finetune", ["student-config-broken", "config.json"], setup="curate", student=hf_dir("student-config-broken", '{"model_type": "llama", ', good))
case("student-safetensors-garbage", "finetune", ["student-safetensors-garbage", "model.safetensors"], setup="curate", student=hf_dir("student-safetensors-garbage", tiny, None))
open(os.path.join(FILES, "student-safetensors-garbage", "model.safetensors"), "wb").write(b"\xff" * 64)

# --- cases.toml ---
def toml_value(v):
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


with open(os.path.join(HERE, "cases.toml"), "w") as f:
    f.write("# Written by make.py: one [[case]] per malformed input. See tests/bad_corpus.rs.\n")
    for c in cases:
        f.write("\n[[case]]\n")
        for k, v in c.items():
            f.write(f"{k} = {toml_value(v)}\n")
print(f"{len(cases)} cases")
