#!/usr/bin/env python3
"""Write kdpipe's small example inputs (datasets/*.jsonl) from templates.

Both sets are synthetic, written for kdpipe from the templates below (no third-party
text): `arith.jsonl`, one- and two-step arithmetic word problems with their answers, and
`feelings.jsonl`, short posts labelled anger / joy / optimism / sadness. Deterministic:
re-running writes the same files.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "datasets"
rng = random.Random(20261128)

NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
THINGS = [("marbles", "bag"), ("stickers", "sheet"), ("pencils", "box"), ("cookies", "tray"),
          ("books", "shelf"), ("eggs", "carton"), ("cards", "pack"), ("beads", "jar")]


def arith_rows(n):
    rows = []
    kinds = ["add", "sub", "mul", "div", "add_mul", "sub_div"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        name = rng.choice(NAMES)
        thing, unit = rng.choice(THINGS)
        a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 9)
        if kind == "add":
            q = f"{name} has {a} {thing}. A friend gives {name} {b} more. How many {thing} does {name} have now?"
            ans = a + b
        elif kind == "sub":
            a = a + b
            q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
            ans = a - b
        elif kind == "mul":
            q = f"There are {b} {unit}s with {c} {thing} in each {unit}. How many {thing} are there in all?"
            ans = b * c
        elif kind == "div":
            total = b * c
            q = f"{name} shares {total} {thing} equally among {b} friends. How many {thing} does each friend get?"
            ans = c
        elif kind == "add_mul":
            q = f"{name} has {a} {thing} and buys {b} {unit}s with {c} {thing} in each. How many {thing} does {name} have now?"
            ans = a + b * c
        else:
            total = b * c + a
            q = f"{name} had {total} {thing}, used {a} of them, and packed the rest equally into {b} {unit}s. How many {thing} are in each {unit}?"
            ans = c
        rows.append({"id": f"arith-{i:03d}", "question": q, "answer": ans})
    return rows


FEELINGS = {
    "anger": [
        "My {thing} arrived broken again and support just hung up on me. Unbelievable.",
        "Who thought it was okay to cancel my {event} an hour before? I am furious.",
        "Stuck on hold for two hours with {company}. This is a disgrace.",
        "Someone scratched my car in the lot and drove off. So mad right now.",
        "{company} charged me twice and refuses to refund. Absolutely livid.",
    ],
    "joy": [
        "Just got the news: I passed my {exam}! Dancing around the kitchen!",
        "Best {event} ever, laughed until my cheeks hurt with everyone.",
        "My sister surprised me with {thing} today and I can't stop smiling!",
        "Sunshine, coffee and a free afternoon. Life is wonderful today.",
        "We won the {event}!! What a night, so happy!",
    ],
    "optimism": [
        "Rough week, but tomorrow I start fresh at the {event}. Things will get better.",
        "Failed the {exam} this time, but I know I'll pass it next round.",
        "New job search starts today. I have a good feeling about this year.",
        "The clinic says recovery takes time, and I'm sure I'll be running again by spring.",
        "Small steps every day. Saving for {thing} and I'll get there soon.",
    ],
    "sadness": [
        "Missing my grandmother so much today. The house feels empty without her.",
        "Had to say goodbye to our old dog this morning. Heartbroken.",
        "Nobody came to my {event}. Sitting alone with the cake.",
        "Lost the {thing} my dad gave me. I keep crying about it.",
        "Another lonely weekend. Everyone seems to have somewhere to be but me.",
    ],
}
FILL = {
    "thing": ["new laptop", "phone", "bike", "guitar", "watch", "package"],
    "event": ["birthday party", "match", "concert", "interview", "game night", "reunion"],
    "exam": ["driving test", "final exam", "bar exam", "math test"],
    "company": ["the airline", "my bank", "the phone company", "the landlord"],
}


def fill(template):
    out = template
    for key, options in FILL.items():
        token = "{" + key + "}"
        while token in out:
            out = out.replace(token, rng.choice(options), 1)
    return out


def feelings_rows(n):
    rows, seen = [], set()
    labels = list(FEELINGS)
    i = 0
    while len(rows) < n:
        label = labels[i % len(labels)]
        text = fill(rng.choice(FEELINGS[label]))
        i += 1
        if text in seen and i < 10 * n:
            continue
        seen.add(text)
        rows.append({"id": f"feel-{len(rows):03d}", "text": text, "label": label})
    return rows


def write(name, rows):
    path = OUT / name
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    write("arith.jsonl", arith_rows(120))
    write("feelings.jsonl", feelings_rows(120))
