"""The anchor of the curate benchmark: kdpipe's curation rules written in Python Polars the
way a Polars expert would, on the same teacher file and the same settings
(scripts/bench/curate.sh passes both the same values):

- lazy plans, each collected once (Polars' default streaming engine where it applies);
- the distinct inputs normalized once, every per-input fact (exact-duplicate group,
  near-duplicate cluster, contamination, split) computed on them and joined back;
- word n-grams hashed to integers (word hashes combined across plain shifts, windows that
  cross a text's end masked out), never built as strings;
- MinHash signatures as 128 grouped minima, LSH banding by grouping on band hashes: each
  text is compared with the first text of its bucket, as kdpipe does, and only the
  candidate pairs are joined and scored; connected components of the near-duplicate
  edges in a small union-find (there are few edges);
- Python only for the arithmetic evaluator (on distinct equations) and the sha256 of each
  split key (on distinct clusters): Polars has no expression for either.

Counts differ from kdpipe's only where hash functions do (MinHash estimates, n-gram hashes).

    python curate_polars.py TEACHER_PARQUET EVAL_JSONL OUT_DIR [--min-agreement 0.5]
        [--near-dup 0.8] [--shingle 3] [--ngram 13] [--seed 0] [--split 0.8,0.1,0.1]
Prints the funnel and the seconds on stderr, and one JSON line on stdout.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

import polars as pl

TOL = 1e-6
NUM = r"-?\d[\d,]*(?:\.\d+)?"
EQ = re.compile(
    r"((?:\(\s*)*\$?\d[\d,]*(?:\.\d+)?(?:\s*\)\s*)*(?:\s*[-+*/×÷x−]\s*(?:\(\s*)*\$?\d[\d,]*(?:\.\d+)?(?:\s*\))*)+)\s*=\s*(-?\$?\d[\d,]*(?:\.\d+)?)"
)
BANDS, ROWS = 16, 8
MASK = (1 << 64) - 1
PRIME = 0x100000001B3  # combines word hashes into a window hash (wrapping u64 arithmetic)


def evaluate(expr):
    """+ - * / and parentheses over numbers; None for anything else (no eval())."""
    toks, i = [], 0
    s = expr.replace("×", "*").replace("x", "*").replace("÷", "/").replace("−", "-").replace("$", "")
    while i < len(s):
        c = s[i]
        if c == " ":
            i += 1
        elif c.isdigit():
            j = i
            while j < len(s) and (s[j].isdigit() or s[j] in ",."):
                j += 1
            toks.append(float(s[i:j].rstrip(".,").replace(",", "")))
            i = j
        elif c in "+-*/()":
            toks.append(c)
            i += 1
        else:
            return None
    pos = [0]

    def peek():
        return toks[pos[0]] if pos[0] < len(toks) else None

    def atom():
        t = peek()
        if isinstance(t, float):
            pos[0] += 1
            return t
        if t == "-":
            pos[0] += 1
            v = atom()
            return None if v is None else -v
        if t == "(":
            pos[0] += 1
            v = add()
            if v is None or peek() != ")":
                return None
            pos[0] += 1
            return v
        return None

    def mul():
        v = atom()
        while v is not None and peek() in ("*", "/"):
            op = toks[pos[0]]
            pos[0] += 1
            r = atom()
            if r is None or (op == "/" and r == 0):
                return None
            v = v * r if op == "*" else v / r
        return v

    def add():
        v = mul()
        while v is not None and peek() in ("+", "-"):
            op = toks[pos[0]]
            pos[0] += 1
            r = mul()
            if r is None:
                return None
            v = v + r if op == "+" else v - r
        return v

    v = add()
    return v if v is not None and pos[0] == len(toks) else None


def equation_holds(eq):
    m = EQ.fullmatch(eq)
    if not m:
        return True
    left, right = evaluate(m.group(1)), m.group(2).replace("$", "").replace(",", "")
    try:
        right = float(right)
    except ValueError:
        return True
    if left is None:
        return True
    return abs(left - right) <= TOL * max(abs(right), 1.0) or round(left * 100) / 100 == right


def normalized(c):
    return pl.col(c).str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()


def window_hashes(texts, n, key):
    """(key, _g) for every n-word window's hash of each text in column `_t` (the whole
    text's hash when it is shorter than n words). Rows of one text are contiguous after
    the explode, so plain shifts see the next words; windows past the text's end are
    masked out by position."""
    words = (
        texts.with_columns(pl.col("_t").str.split(" ").alias("_w"))
        .with_columns(pl.col("_w").list.len().alias("_nw"))
        .explode("_w")
        .with_columns(
            pl.int_range(pl.len()).over(key).alias("_pos"),
            pl.col("_w").hash(11).alias("_h"),
        )
    )
    g = pl.col("_h")
    for j in range(1, n):
        g = g * pl.lit(PRIME, pl.UInt64) + pl.col("_h").shift(-j)
    long_window = (pl.col("_pos") + n <= pl.col("_nw")) & (pl.col("_nw") >= n)
    short_text = (pl.col("_nw") < n) & (pl.col("_pos") == 0)
    # The shifts read the neighbouring rows: computed before the filter drops any.
    return (
        words.with_columns(pl.when(short_text).then(pl.col("_t").hash(13)).otherwise(g).alias("_g"))
        .filter(long_window | short_text)
        .select(key, "_g")
    )


def minhash_clusters(norms, threshold, shingle):
    """Leader (the earliest text) of each distinct normalized text's near-duplicate cluster."""
    shingles = window_hashes(norms.select("_norm", "_t"), shingle, "_norm")
    perms = []
    for i in range(BANDS * ROWS):
        a = (0x9E3779B97F4A7C15 * (2 * i + 1)) & MASK
        b = (i * 0xD6E8FEB86659FD93) & MASK
        y = (pl.col("_g") ^ pl.lit(b, pl.UInt64)) * pl.lit(a, pl.UInt64)
        perms.append((y ^ (y // pl.lit(1 << 29, pl.UInt64))).min().alias(f"m{i}"))
    sig = shingles.group_by("_norm").agg(perms).collect()
    # Each text against the first (smallest index) text of its bucket, band by band.
    pairs = pl.concat(
        [
            sig.lazy()
            .select(
                "_norm",
                pl.col("_norm").min().over(pl.concat_list([f"m{i}" for i in range(b * ROWS, (b + 1) * ROWS)]).hash(17)).alias("_rep"),
            )
            .filter(pl.col("_norm") != pl.col("_rep"))
            for b in range(BANDS)
        ]
    ).unique()
    other = sig.lazy().rename({f"m{i}": f"o{i}" for i in range(BANDS * ROWS)} | {"_norm": "_rep"})
    same = pl.sum_horizontal([(pl.col(f"m{i}") == pl.col(f"o{i}")).cast(pl.UInt32) for i in range(BANDS * ROWS)])
    edges = (
        pairs.join(sig.lazy(), on="_norm")
        .join(other, on="_rep")
        .filter(same >= threshold * BANDS * ROWS)
        .select("_norm", "_rep")
        .collect()
    )
    parent = {}

    def root(i):
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    for i, j in edges.iter_rows():
        ri, rj = root(i), root(j)
        parent[max(ri, rj)] = min(ri, rj)
    leaders = {i: root(i) for i in list(parent)}
    return pl.DataFrame(
        {"_norm": list(leaders), "_cluster": list(leaders.values())},
        schema={"_norm": pl.UInt32, "_cluster": pl.UInt32},
    )


def split_of(key, seed, shares):
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / MASK
    return "train" if u < shares[0] else ("val" if u < shares[0] + shares[1] else "test")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("teacher")
    p.add_argument("eval")
    p.add_argument("out_dir")
    p.add_argument("--min-agreement", type=float, default=0.5)
    p.add_argument("--near-dup", type=float, default=0.8)
    p.add_argument("--shingle", type=int, default=3)
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="0.8,0.1,0.1")
    a = p.parse_args()
    shares = [float(x) for x in a.split.split(",")]
    t0 = time.perf_counter()
    rows = pl.scan_parquet(a.teacher).with_row_index("_row")

    # Per distinct normalized input: exact-duplicate group, cluster, contamination, split.
    norms = (
        rows.select(normalized("input").alias("_t"))
        .unique(maintain_order=True)
        .with_row_index("_norm")
        .collect()
    )
    clusters = minhash_clusters(norms.lazy(), a.near_dup, a.shingle)
    eval_grams = window_hashes(
        pl.scan_ndjson(a.eval).select(normalized("question").alias("_t")).with_row_index("_e"), a.ngram, "_e"
    ).select("_g")
    dirty = window_hashes(norms.lazy(), a.ngram, "_norm").join(eval_grams, on="_g", how="semi").select("_norm").unique()
    per_norm = (
        norms.lazy()
        .join(clusters.lazy(), on="_norm", how="left")
        .with_columns(pl.col("_cluster").fill_null(pl.col("_norm")))
        .join(dirty.with_columns(pl.lit(True).alias("_contaminated")), on="_norm", how="left")
        .with_columns(pl.col("_contaminated").fill_null(False))
        .collect()
    )
    leaders = per_norm.filter(pl.col("_norm") == pl.col("_cluster")).select("_cluster", "_t")
    leaders = leaders.with_columns(
        pl.Series("split", [split_of(t, a.seed, shares) for t in leaders["_t"]], dtype=pl.String)
    ).drop("_t")
    per_norm = per_norm.join(leaders, on="_cluster").rename({"_t": "_norm_text"})

    # Rationale checks: the answer stated; equations (distinct ones evaluated in Python).
    nums = (
        rows.select("_row", "answer", pl.col("rationale").str.extract_all(NUM).alias("_n"))
        .explode("_n")
        .with_columns(
            pl.col("_n").str.replace_all(",", "").cast(pl.Float64, strict=False),
            pl.col("answer").cast(pl.Float64, strict=False).alias("_a"),
        )
        .group_by("_row")
        .agg(((pl.col("_n") - pl.col("_a")).abs() <= TOL * pl.max_horizontal(pl.col("_a").abs(), 1.0)).any().alias("_states_answer"))
    )
    eqs = rows.select("_row", pl.col("rationale").str.extract_all(EQ.pattern).alias("_e")).explode("_e").drop_nulls("_e")
    distinct_eqs = eqs.select(pl.col("_e").unique()).collect()["_e"].to_list()
    verdict = pl.LazyFrame({"_e": distinct_eqs, "_ok": [equation_holds(e) for e in distinct_eqs]})
    arith = eqs.join(verdict, on="_e").group_by("_row").agg(pl.col("_ok").all().alias("_arith_ok"))
    conf = (
        rows.select("_row", "answer", "soft_labels", "soft_probs")
        .explode(["soft_labels", "soft_probs"])
        .group_by("_row")
        .agg(
            (pl.col("soft_probs").filter(pl.col("soft_labels") == pl.col("answer")).first() / pl.col("soft_probs").sum()).alias(
                "_confidence"
            )
        )
    )
    lf = (
        rows.with_columns(normalized("input").alias("_norm_text"))
        .join(per_norm.lazy(), on="_norm_text", how="left")
        .join(nums, on="_row", how="left")
        .join(arith, on="_row", how="left")
        .join(conf, on="_row", how="left")
        .with_columns(pl.col("_arith_ok").fill_null(True), pl.col("_states_answer").fill_null(False))
        .sort("_row")
    )

    # The rules, each a keep column after the previous one, in kdpipe's order.
    funnel = []
    prev = "k_parse_failure"
    lf = lf.with_columns(pl.col("status").is_in(["ok", "rescued"]).alias(prev))

    def rule(lf, name, passes):
        nonlocal prev
        nxt = f"k_{name}"
        lf = lf.with_columns((pl.col(prev) & passes.fill_null(False)).alias(nxt))
        funnel.append((name, prev, nxt))
        prev = nxt
        return lf

    def first_kept(group, key):
        return (pl.col(key) == pl.col(key).filter(pl.col(prev)).first().over(group)).fill_null(False)

    ans, gold = pl.col("answer").cast(pl.Float64, strict=False), pl.col("gold").cast(pl.Float64, strict=False)
    lf = lf.with_columns(((ans - gold).abs() <= TOL * pl.max_horizontal(gold.abs(), 1.0)).alias("agrees_with_gold"))
    lf = rule(lf, "disagrees_with_gold", pl.col("gold").is_null() | pl.col("agrees_with_gold"))
    votes = (
        lf.filter(pl.col(prev))
        .group_by("id", "answer")
        .agg(pl.len().alias("_votes"))
        .sort(["id", "_votes", "answer"], descending=[False, True, False])
        .group_by("id")
        .agg(pl.col("answer").first().alias("_majority"), pl.col("_votes").first().alias("_mv"))
    )
    lf = (
        lf.with_columns(pl.len().over("id").alias("_samples"))
        # The rules below pick "the first kept row" of a group: row order must survive.
        .join(votes, on="id", how="left", maintain_order="left")
        .with_columns((pl.col("_mv") / pl.col("_samples")).alias("_agreement"))
    )
    multi = pl.col("_samples") > 1
    lf = rule(lf, "low_agreement", ~multi | (pl.col("_agreement") >= a.min_agreement))
    lf = rule(lf, "minority_answer", ~multi | (pl.col("answer") == pl.col("_majority")))
    lf = rule(lf, "low_confidence", pl.col("_confidence").is_null() | (pl.col("_confidence") >= 0.0))
    chars = pl.col("rationale").fill_null("").str.len_chars()
    lf = rule(lf, "rationale_length", (chars >= 1) & (chars <= 4000))
    lf = rule(lf, "answer_not_in_rationale", pl.col("_states_answer"))
    lf = rule(lf, "wrong_arithmetic", pl.col("_arith_ok"))
    lf = rule(lf, "duplicate_input", first_kept("_norm", "id"))
    lf = rule(lf, "near_duplicate_input", first_kept("_cluster", "id"))
    lf = rule(lf, "contaminated", ~pl.col("_contaminated"))
    all_rows = lf.collect()

    rows_in = all_rows.height
    counts = [("parse_failure", rows_in - all_rows["k_parse_failure"].sum())]
    for name, before, after in funnel:
        counts.append((name, all_rows[before].sum() - all_rows[after].sum()))
    kept = all_rows.filter(pl.col(prev)).with_columns(pl.when(multi).then(pl.col("_agreement")).alias("agreement"))
    columns = ["id", "sample", "input", "gold", "rationale", "answer", "soft_kind", "soft_labels", "soft_probs", "agreement", "agrees_with_gold"]
    os.makedirs(a.out_dir, exist_ok=True)
    splits = {}
    for split in ["train", "val", "test"]:
        part = kept.filter(pl.col("split") == split).select(columns)
        part.write_parquet(f"{a.out_dir}/{split}.parquet", compression="zstd")
        splits[split] = part.height
    secs = time.perf_counter() - t0
    for name, n in counts:
        print(f"  {name:24} {n}", file=sys.stderr)
    print(
        json.dumps(
            {"engine": f"Python Polars {pl.__version__}", "rows_in": rows_in, "rows_out": kept.height, "splits": splits, "seconds": round(secs, 2), "funnel": dict(counts)}
        )
    )


if __name__ == "__main__":
    main()
