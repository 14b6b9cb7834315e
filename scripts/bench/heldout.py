"""Training pools and held-back rows of the quality benchmarks, by a fixed rule (nothing
random to reproduce): SVAMP keeps every 7th row of dev.jsonl back and the rest is the
pool, followed by GSM8K's training problems (the numeric task's pool at scale; a prefix of
up to 579 rows is SVAMP alone, as before); TweetEval emotion's pool is train.jsonl and its held-back rows val.jsonl, both
interleaved by label so that any prefix covers every label, and val.jsonl once more as it
comes (its natural label distribution).

    python3 scripts/bench/heldout.py DATA WORK

writes WORK/{svamp,emotion}-{pool,heldout}.jsonl and WORK/emotion-heldout-natural.jsonl.
"""
import json
import sys

data, work = sys.argv[1:3]


def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def write(path, rs):
    with open(path, "w") as f:
        for r in rs:
            f.write(json.dumps(r) + "\n")


def interleave(rs):
    by = {}
    for r in rs:
        by.setdefault(r["label"], []).append(r)
    out, i = [], 0
    while any(i < len(v) for v in by.values()):
        out += [v[i] for v in by.values() if i < len(v)]
        i += 1
    return out


svamp = rows(f"{data}/svamp/dev.jsonl")
gsm8k = [{k: r[k] for k in ("id", "question", "answer")} for r in rows(f"{data}/gsm8k/train.jsonl")]
write(f"{work}/svamp-pool.jsonl", [r for i, r in enumerate(svamp) if i % 7 != 0] + gsm8k)
write(f"{work}/svamp-heldout.jsonl", [r for i, r in enumerate(svamp) if i % 7 == 0])
write(f"{work}/emotion-pool.jsonl", interleave(rows(f"{data}/tweeteval-emotion/train.jsonl")))
write(f"{work}/emotion-heldout.jsonl", interleave(rows(f"{data}/tweeteval-emotion/val.jsonl")))
write(f"{work}/emotion-heldout-natural.jsonl", rows(f"{data}/tweeteval-emotion/val.jsonl"))
