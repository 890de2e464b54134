"""Generator of the tiny_arithmetic domain: two-number word problems with a one-line worked answer.

Task: "Mia has 7 shells and buys 5 more. How many shells does Mia have now?" -> "Mia has 7 + 5 = 12 shells.
The answer is 12." Numbers are 1-9; a problem adds or takes away (never below 0), in one of four phrasings.
Why it exercises ``exact_match``: the answer ends with GSM8K's "The answer is N" (arXiv:2110.14168), which the
strict ``gsm8k`` extractor reads (the headline), beside the flexible ``last_number``. Copying the two numbers
into the working is easy for a tiny model; the sum or difference is a table of 126 facts it must learn, so the
score rises with training on this domain and not with the format alone.

Disjoint by construction: every problem (phrasing, name, object, numbers) is generated once, the pool is
shuffled with the seed and cut into test, validation and training parts; every fact of a test problem is also
taught in training, under other names and objects. Regenerate the shipped files with
``python -m mergeplug_plugins.domains.tiny_arithmetic.generate`` (the seed and sizes below are the shipped ones).
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

from mergeplug.tiny import generator_main, split_pool

HERE = Path(__file__).parent
SEED = 11
SIZES = {"test": 100, "validation": 200, "train": 3000}

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Leo", "Zoe")
OBJECTS = ("apples", "pears", "cards", "books", "coins", "shells", "pens", "eggs")
# (operation, question, worked answer without the final sentence)
PHRASINGS = (
    ("+", "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
     "{name} has {a} + {b} = {c} {obj}."),
    ("+", "{name} has {a} {obj}. A friend gives {name} {b} more. How many {obj} does {name} have?",
     "{name} has {a} + {b} = {c} {obj}."),
    ("-", "{name} has {a} {obj} and gives away {b}. How many {obj} are left?",
     "{name} has {a} - {b} = {c} {obj} left."),
    ("-", "{name} had {a} {obj} and lost {b} of them. How many {obj} does {name} have now?",
     "{name} has {a} - {b} = {c} {obj} left."),
)


def problems() -> list[dict]:
    """Every distinct problem, in a fixed order."""
    pool = []
    for (op, question, working), name, obj, a, b in itertools.product(PHRASINGS, NAMES, OBJECTS, range(1, 10),
                                                                      range(1, 10)):
        if op == "-" and b > a:
            continue
        c = a + b if op == "+" else a - b
        fields = {"name": name, "obj": obj, "a": a, "b": b, "c": c}
        pool.append({"question": question.format(**fields), "working": working.format(**fields), "answer": str(c),
                     "fact": f"{a}{op}{b}"})
    return pool


def generate(seed: int = SEED, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} rows: instruction/response for the first two, question/answer for the test."""
    parts = split_pool(problems(), sizes or SIZES, random.Random(seed))
    taught = {p["fact"] for p in parts["train"]}
    missing = [p["question"] for p in parts["test"] if p["fact"] not in taught]
    if missing:  # the seed and sizes are fixed; this guards edits to them
        raise ValueError(f"tiny_arithmetic: test problems whose fact is not in training: {missing[:3]}")

    def taught_row(p: dict) -> dict:
        return {"instruction": p["question"], "response": f"{p['working']} The answer is {p['answer']}."}

    return {
        "train": [taught_row(p) for p in parts["train"]],
        "validation": [taught_row(p) for p in parts["validation"]],
        "test": [{"id": f"arithmetic-{i:03d}", "question": p["question"], "answer": p["answer"]}
                 for i, p in enumerate(parts["test"])],
    }


if __name__ == "__main__":
    sys.exit(generator_main(generate, HERE, SEED, sys.argv[1:]))
