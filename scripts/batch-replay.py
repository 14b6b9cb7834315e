#!/usr/bin/env python3
"""Replay OpenAI Batch API request files against an OpenAI-compatible server, one request
at a time, and write the results in the Batch API's output and error file formats.

A stand-in for submitting the files to the Batch API when testing locally, or for running
a batch against any server that has no batch endpoint (`vllm run-batch` does the same for
vLLM):

    scripts/batch-replay.py --base-url http://127.0.0.1:8000/v1 \
        --output out.jsonl --errors errors.jsonl requests-00000.jsonl ...

Lines whose request failed (non-200 status or no answer) go to the error file with the
status and body the server gave.
"""
import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid


def post(base_url, path, body, key, timeout):
    url = base_url.rstrip("/") + path.removeprefix("/v1")
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": {"message": raw.decode(errors="replace")}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--errors", required=True)
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("files", nargs="+")
    a = p.parse_args()
    import os

    key = os.environ.get(a.api_key_env) if a.api_key_env else None
    n_ok = n_err = 0
    with open(a.output, "w") as out, open(a.errors, "w") as err:
        for name in a.files:
            with open(name) as f:
                for line in f:
                    if not line.strip():
                        continue
                    r = json.loads(line)
                    try:
                        status, body = post(a.base_url, r["url"], r["body"], key, a.timeout)
                    except OSError as e:
                        status, body = 0, None
                        error = {"code": "connection_error", "message": str(e)}
                    else:
                        error = None
                    result = {
                        "id": f"batch_req_{uuid.uuid4().hex}",
                        "custom_id": r["custom_id"],
                        "response": None
                        if status == 0
                        else {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
                        "error": error,
                    }
                    if status == 200:
                        out.write(json.dumps(result) + "\n")
                        n_ok += 1
                    else:
                        err.write(json.dumps(result) + "\n")
                        n_err += 1
    print(f"batch-replay: {n_ok} succeeded, {n_err} failed", file=sys.stderr)


if __name__ == "__main__":
    main()
