"""The anchor of the curate benchmark: kdpipe's curation rules written with Python Polars,
on the same teacher file and the same settings as scripts/bench/curate.sh gives kdpipe
(min_agreement 0.5, one rationale an input, gold flagged, rationale 1–4000 characters,
answer stated, arithmetic checked, exact dedup, MinHash near-dup at 0.8 over 3-word
shingles with 16 bands × 8 rows, 13-gram decontamination, splits 0.8/0.1/0.1 by a seeded
sha256 of the near-duplicate cluster). Vectorized Polars wherever Polars can express the
rule; Python only for the arithmetic evaluator (on distinct equations) and union-find.

    python curate_polars.py TEACHER_PARQUET EVAL_JSONL OUT_DIR
Prints the funnel and the seconds on stderr, and one JSON line on stdout.
"""
import hashlib
import json
import re
import sys
import time

import polars as pl

TOL = 1e-6
NUM = r"-?\d[\d,]*(?:\.\d+)?"
EQ = re.compile(
    r"((?:\(\s*)*\$?\d[\d,]*(?:\.\d+)?(?:\s*\)\s*)*(?:\s*[-+*/×÷x−]\s*(?:\(\s*)*\$?\d[\d,]*(?:\.\d+)?(?:\s*\))*)+)\s*=\s*(-?\$?\d[\d,]*(?:\.\d+)?)"
)
BANDS, ROWS, THRESHOLD, SHINGLE, NGRAM = 16, 8, 0.8, 3, 13
MASK = (1 << 64) - 1


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


def norm_expr(c):
    return pl.col(c).str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()


def word_windows(texts, n, key):
    """(key, window text) for every n-word window of each text (the text when shorter)."""
    words = (
        texts.with_columns(pl.col("_t").str.split(" ").alias("_w"))
        .with_columns(pl.col("_w").list.len().alias("_nw"))
        .explode("_w")
        .with_columns(pl.int_range(pl.len()).over(key).alias("_pos"))
    )
    shifted = [pl.col("_w").shift(-j).over(key) for j in range(n)]
    grams = words.with_columns(pl.concat_str(shifted, separator=" ").alias("_g")).filter(
        (pl.col("_pos") + n <= pl.col("_nw")) | ((pl.col("_nw") < n) & (pl.col("_pos") == 0))
    )
    return grams.with_columns(
        pl.when(pl.col("_nw") < n).then(pl.col("_t")).otherwise(pl.col("_g")).alias("_g")
    ).select(key, "_g")


def near_dup_clusters(norms):
    """Cluster leader (index of the first text) of each distinct normalized text."""
    texts = pl.DataFrame({"_t": norms}).with_row_index("_k")
    sh = word_windows(texts, SHINGLE, "_k").with_columns(pl.col("_g").hash(7).alias("_h"))
    perms = []
    for i in range(BANDS * ROWS):
        a = (0x9E3779B97F4A7C15 * (2 * i + 1)) & MASK
        b = (i * 0xD6E8FEB86659FD93) & MASK
        y = (pl.col("_h") ^ pl.lit(b, pl.UInt64)) * pl.lit(a, pl.UInt64)
        perms.append((y ^ (y // pl.lit(1 << 29, pl.UInt64))).min().alias(f"m{i}"))
    sig = sh.group_by("_k").agg(perms).sort("_k")
    m = sig.select([f"m{i}" for i in range(BANDS * ROWS)]).to_numpy()
    keys = sig["_k"].to_list()
    parent = list(range(len(norms)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(BANDS):
        seen = {}
        block = m[:, band * ROWS : (band + 1) * ROWS]
        for row, k in enumerate(keys):
            bk = block[row].tobytes()
            j = seen.setdefault(bk, row)
            if j != row and (m[row] == m[j]).mean() >= THRESHOLD:
                a, b = root(keys[row]), root(keys[j])
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(norms))]


def split_of(key, seed=0):
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / MASK
    return "train" if u < 0.8 else ("val" if u < 0.9 else "test")


def main():
    teacher, eval_path, out_dir = sys.argv[1:4]
    t0 = time.perf_counter()
    df = pl.read_parquet(teacher).with_row_index("_row")
    rows_in = df.height

    # Distinct normalized inputs: exact-dup groups, near-dup clusters, contamination, split.
    norms = (
        df.select(norm_expr("input").alias("_t")).unique(maintain_order=True)["_t"].to_list()
    )
    leaders = near_dup_clusters(norms)
    eval_texts = pl.read_ndjson(eval_path).select(norm_expr("question").alias("_t"))
    eval_grams = set(word_windows(eval_texts.with_row_index("_k"), NGRAM, "_k")["_g"].to_list())
    grams = word_windows(pl.DataFrame({"_t": norms}).with_row_index("_k"), NGRAM, "_k")
    dirty = set(grams.filter(pl.col("_g").is_in(list(eval_grams)))["_k"].to_list())
    per_norm = pl.DataFrame(
        {
            "_norm_text": norms,
            "_norm": list(range(len(norms))),
            "_cluster": leaders,
            "_contaminated": [i in dirty for i in range(len(norms))],
            "split": [split_of(norms[c]) for c in leaders],
        },
        schema_overrides={"_norm": pl.UInt32, "_cluster": pl.UInt32},
    )
    df = df.with_columns(norm_expr("input").alias("_norm_text")).join(
        per_norm, on="_norm_text", how="left"
    )

    # Rationale checks: numbers stated; equations (distinct ones evaluated in Python).
    nums = (
        df.select("_row", "answer", pl.col("rationale").str.extract_all(NUM).alias("_n"))
        .explode("_n")
        .with_columns(
            pl.col("_n").str.replace_all(",", "").cast(pl.Float64, strict=False),
            pl.col("answer").cast(pl.Float64, strict=False).alias("_a"),
        )
        .group_by("_row")
        .agg(((pl.col("_n") - pl.col("_a")).abs() <= TOL * pl.max_horizontal(pl.col("_a").abs(), 1.0)).any().alias("_states_answer"))
    )
    eqs = (
        df.select("_row", pl.col("rationale").str.extract_all(EQ.pattern).alias("_e"))
        .explode("_e")
        .drop_nulls("_e")
    )
    distinct_eqs = eqs["_e"].unique().to_list()
    verdict = pl.DataFrame({"_e": distinct_eqs, "_ok": [equation_holds(e) for e in distinct_eqs]})
    arith = eqs.join(verdict, on="_e").group_by("_row").agg(pl.col("_ok").all().alias("_arith_ok"))
    conf = (
        df.select("_row", "answer", "soft_labels", "soft_probs")
        .explode(["soft_labels", "soft_probs"])
        .group_by("_row")
        .agg(
            (pl.col("soft_probs").filter(pl.col("soft_labels") == pl.col("answer")).first() / pl.col("soft_probs").sum()).alias("_confidence")
        )
    )
    df = (
        df.join(nums, on="_row", how="left")
        .join(arith, on="_row", how="left")
        .join(conf, on="_row", how="left")
        .with_columns(pl.col("_arith_ok").fill_null(True), pl.col("_states_answer").fill_null(False))
        .sort("_row")
    )

    # The rules, each a keep column after the previous one.
    usable = pl.col("status").is_in(["ok", "rescued"])
    lf = df.lazy().with_columns(usable.alias("k_parse_failure"))
    votes = (
        lf.filter(pl.col("k_parse_failure"))
        .group_by("id", "answer")
        .agg(pl.len().alias("_votes"))
        .sort(["id", "_votes", "answer"], descending=[False, True, False])
        .group_by("id")
        .agg(pl.col("answer").first().alias("_majority"), pl.col("_votes").first().alias("_mv"))
    )
    lf = (
        lf.with_columns(pl.len().over("id").alias("_samples"))
        .join(votes, on="id", how="left")
        .with_columns((pl.col("_mv") / pl.col("_samples")).alias("_agreement"))
    )
    multi = pl.col("_samples") > 1
    prev = "k_parse_failure"
    funnel = []

    def rule(lf, name, passes):
        nonlocal prev
        nxt = f"k_{name}"
        lf = lf.with_columns((pl.col(prev) & passes.fill_null(False)).alias(nxt))
        funnel.append((name, prev, nxt))
        prev = nxt
        return lf

    def first_kept(group, key):
        return (pl.col(key) == pl.col(key).filter(pl.col(prev)).first().over(group)).fill_null(False)

    lf = rule(lf, "low_agreement", ~multi | (pl.col("_agreement") >= 0.5))
    lf = rule(lf, "minority_answer", ~multi | (pl.col("answer") == pl.col("_majority")))
    lf = rule(lf, "extra_rationale", first_kept("id", "sample"))
    a, g = pl.col("answer").cast(pl.Float64, strict=False), pl.col("gold").cast(pl.Float64, strict=False)
    lf = lf.with_columns(((a - g).abs() <= TOL * pl.max_horizontal(g.abs(), 1.0)).alias("agrees_with_gold"))
    lf = rule(lf, "low_confidence", pl.col("_confidence").is_null() | (pl.col("_confidence") >= 0.0))
    chars = pl.col("rationale").fill_null("").str.len_chars()
    lf = rule(lf, "rationale_length", (chars >= 1) & (chars <= 4000))
    lf = rule(lf, "answer_not_in_rationale", pl.col("_states_answer"))
    lf = rule(lf, "wrong_arithmetic", pl.col("_arith_ok"))
    lf = rule(lf, "duplicate_input", first_kept("_norm", "id"))
    lf = rule(lf, "near_duplicate_input", first_kept("_cluster", "id"))
    lf = rule(lf, "contaminated", ~pl.col("_contaminated"))
    all_rows = lf.collect()

    counts = [("parse_failure", rows_in - all_rows["k_parse_failure"].sum())]
    for name, before, after in funnel:
        counts.append((name, all_rows[before].sum() - all_rows[after].sum()))
    kept = all_rows.filter(pl.col(prev)).with_columns(
        pl.when(multi).then(pl.col("_agreement")).alias("agreement")
    )
    columns = ["id", "sample", "input", "gold", "rationale", "answer", "soft_kind", "soft_labels", "soft_probs", "agreement", "agrees_with_gold"]
    import os

    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for split in ["train", "val", "test"]:
        part = kept.filter(pl.col("split") == split).select(columns)
        part.write_parquet(f"{out_dir}/{split}.parquet", compression="zstd")
        splits[split] = part.height
    secs = time.perf_counter() - t0
    for name, n in counts:
        print(f"  {name:24} {n}", file=sys.stderr)
    print(json.dumps({"engine": f"Python Polars {pl.__version__}", "rows_in": rows_in, "rows_out": kept.height, "splits": splits, "seconds": round(secs, 2), "funnel": dict(counts)}))


if __name__ == "__main__":
    main()
