# Sourced by the benchmarks that read whole public data sets: sets $data to KDPIPE_DATA
# (default ../shared/data beside the checkout) and stops with what to put there when the
# files the benchmark needs are missing. Usage: `. scripts/bench/data-dir.sh FILE…`
# (paths relative to the data folder).
data="${KDPIPE_DATA:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/../shared/data}"
for needed in "$@"; do
  if [ ! -f "$data/$needed" ]; then
    cat >&2 <<MSG
error: $data/$needed is missing
hint: set KDPIPE_DATA to a folder holding the public data sets as JSONL:
  svamp/dev.jsonl                 SVAMP (Patel et al., 2021; MIT): id, question, answer
  gsm8k/train.jsonl               GSM8K (Cobbe et al., 2021; MIT): id, question, rationale, answer
  tweeteval-emotion/train.jsonl   TweetEval emotion (Barbieri et al., 2020): id, text, label
  tweeteval-emotion/val.jsonl
MSG
    exit 2
  fi
done
