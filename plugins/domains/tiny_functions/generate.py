"""Generator of the tiny_functions domain: one-line Python string functions from a family of templates.

Task: "Write a Python function solve(text) that returns text reversed, then in upper case." ->
"def solve(text):\n    return text[::-1].upper()". A function applies one of 34 string operations (case changes,
strips, slices, reversal, sorting, a letter added or replaced, its length, its words, a letter counted or found,
start, end, containment and case tests) or two string operations in a row, to a parameter named s, text, word or
name. The test row's ``tests`` are asserts on five fixed strings (for a test of a letter: strings built around that
letter), their expected values computed here by running the reference function.

Why it exercises ``pass_at_k``: the answer is a whole program (parameter ``program: completion``), run with its
asserts in the evaluator's sandbox; it passes only when the parameter, the operations and their letters are all
right, so pass@1 (one greedy sample) measures whether the model maps the words to code (Codex's pass@k,
arXiv:2107.03374). Strings rather than numbers keep this domain's skills apart from tiny_arithmetic's (digits and
+ and -): in our calibration, a numeric variant's task vector undid much of the arithmetic specialist's gain when
the two were merged.

Disjoint by construction: every request (phrasing, parameter, operations) is generated once, the pool is shuffled
with the seed and cut into test, validation and training parts. Regenerate the shipped files with
``python -m mergeplug_plugins.domains.tiny_functions.generate``.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

from mergeplug.tiny import generator_main, split_pool

HERE = Path(__file__).parent
SEED = 12
SIZES = {"test": 80, "validation": 200, "train": 1500}

PARAMS = ("s", "text", "word", "name")
LETTERS = "aeinorst"
ENDINGS = (*LETTERS, "!", "?")
#: The strings the asserts call each function with: mixed case, inner and outer spaces, repeated letters.
TEST_INPUTS = ("banana split", " Sir Toes ", "Otter", "rain or snow", "RAIN")
#: For a count, position, start, end or containment test of the letter {a}: where it is, and a string without it.
LETTER_INPUTS = ("{a}qq", "qq{a}", "q{a}q{a}", "qqq")
# String to string operations: name -> (words of the request after the operand, code over {e}, whether the code is
# an operator expression, which needs brackets before a method or a slice)
STEPS = {
    "upper": ("in upper case", "{e}.upper()", False),
    "lower": ("in lower case", "{e}.lower()", False),
    "title": ("in title case", "{e}.title()", False),
    "capitalize": ("with only its first letter in upper case", "{e}.capitalize()", False),
    "swapcase": ("with the case of each letter swapped", "{e}.swapcase()", False),
    "strip": ("without spaces at both ends", "{e}.strip()", False),
    "lstrip": ("without spaces at the start", "{e}.lstrip()", False),
    "rstrip": ("without spaces at the end", "{e}.rstrip()", False),
    "reversed": ("reversed", "{e}[::-1]", False),
    "every_other": ("with every second letter dropped", "{e}[::2]", False),
    "drop_first": ("without its first letter", "{e}[1:]", False),
    "drop_last": ("without its last letter", "{e}[:-1]", False),
    "twice": ("written twice", "{e} * 2", True),
    "sorted": ("with its letters in sorted order", '"".join(sorted({e}))', False),
    "no_spaces": ("without any spaces", '{e}.replace(" ", "")', False),
    "dashes": ("with dashes instead of spaces", '{e}.replace(" ", "-")', False),
}
WITH_LETTER = {  # {c}: a letter or a mark
    "add_end": ('with "{c}" added at the end', '{e} + "{c}"', True),
    "add_start": ('with "{c}" added at the start', '"{c}" + {e}', True),
}
FINAL = {  # results that are not strings of the same kind: only ever the whole request. {a}: a letter
    "length": ("the length of {p}", "len({p})"),
    "first": ("the first letter of {p}", "{p}[0]"),
    "last": ("the last letter of {p}", "{p}[-1]"),
    "words": ("the number of words in {p}", "len({p}.split())"),
    "split": ("the list of words in {p}", "{p}.split()"),
    "isupper": ("True if {p} is all in upper case", "{p}.isupper()"),
    "islower": ("True if {p} is all in lower case", "{p}.islower()"),
    "isalpha": ("True if {p} has only letters", "{p}.isalpha()"),
    "count": ('the number of "{a}" in {p}', '{p}.count("{a}")'),
    "find": ('the position of the first "{a}" in {p}', '{p}.find("{a}")'),
    "starts": ('True if {p} starts with "{a}"', '{p}.startswith("{a}")'),
    "ends": ('True if {p} ends with "{a}"', '{p}.endswith("{a}")'),
    "contains": ('True if "{a}" is in {p}', '"{a}" in {p}'),
}
#: Every function is called solve: a tiny model learns to copy a name seen once only late in its training, and
#: this domain is about mapping words to code (our choice, after calibration).
NAME = "solve"
PHRASINGS = (
    "Write a Python function {name}({p}) that returns {what}.",
    "Define a function {name}({p}) returning {what}.",
    "Complete the function {name}({p}) so that it returns {what}.",
)
#: Pairs of steps whose order does not matter or that undo each other: not chained (the request would be ambiguous
#: to read or trivial).
UNCHAINED = {frozenset(pair) for pair in (("upper", "lower"), ("upper", "title"), ("lower", "title"),
                                          ("upper", "capitalize"), ("lower", "capitalize"), ("title", "capitalize"),
                                          ("upper", "swapcase"), ("lower", "swapcase"), ("strip", "lstrip"),
                                          ("strip", "rstrip"), ("strip", "no_spaces"), ("no_spaces", "dashes"))}


def _apply(code: str, operator: bool, inner: str, inner_operator: bool) -> str:
    """``code`` with ``{e}`` replaced by ``inner``, bracketed when ``inner`` is an operator expression and
    ``code`` applies a method or slice to it."""
    if inner_operator and not code.startswith("{e} ") and not code.startswith('"') and "sorted" not in code:
        inner = f"({inner})"
    return code.replace("{e}", inner)


def specs() -> list[tuple[str, str, tuple]]:
    """Every distinct operation as (the request's words over {p}, the returned expression over {p}, the inputs
    of its asserts)."""
    steps = {name: (words, code, op) for name, (words, code, op) in STEPS.items()}
    for name, (words, code, op) in WITH_LETTER.items():
        steps.update({f"{name}_{c}": (words.format(c=c), code.replace("{c}", c), op) for c in ENDINGS})
    steps.update({f"replace_{a}{b}": (f'with every "{a}" replaced by "{b}"', f'{{e}}.replace("{a}", "{b}")', False)
                  for a, b in itertools.permutations(LETTERS[:6], 2)})
    out = [("{p} " + words, code.replace("{e}", "{p}"), TEST_INPUTS) for words, code, _ in steps.values()]
    # two steps: one of STEPS, then another of STEPS or a letter added at the end
    seconds = {name: steps[name] for name in (*STEPS, *(f"add_end_{c}" for c in ENDINGS))}
    for (k1, (w1, c1, op1)), (k2, (w2, c2, op2)) in itertools.product(STEPS.items(), seconds.items()):
        if k1 == k2 or frozenset((k1, k2)) in UNCHAINED:
            continue
        code = _apply(c2, op2, c1.replace("{e}", "{p}"), op1)
        out.append((f"{{p}} {w1}, then {w2}", code, TEST_INPUTS))
    for words, code in FINAL.values():
        if "{a}" not in code:
            out.append((words, code, TEST_INPUTS))
            continue
        out += [(words.replace("{a}", a), code.replace("{a}", a), tuple(x.format(a=a) for x in LETTER_INPUTS))
                for a in LETTERS]
    return out


def functions() -> list[dict]:
    """Every distinct request, in a fixed order."""
    pool = []
    for phrasing, p, (words, code, inputs) in itertools.product(PHRASINGS, PARAMS, specs()):
        pool.append({"instruction": phrasing.format(name=NAME, p=p, what=words.replace("{p}", p)), "name": NAME,
                     "param": p, "expression": code.replace("{p}", p), "inputs": inputs})
    return pool


def _program(f: dict) -> str:
    return f"def {f['name']}({f['param']}):\n    return {f['expression']}"


def _tests(f: dict) -> str:
    scope: dict = {}
    exec(_program(f), scope)  # our own template code, made just above
    return "".join(f"assert {f['name']}({x!r}) == {scope[f['name']](x)!r}\n" for x in f["inputs"])


def generate(seed: int = SEED, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: instruction/response rows, and test rows with instruction and tests."""
    parts = split_pool(functions(), sizes or SIZES, random.Random(seed))

    def taught_row(f: dict) -> dict:
        return {"instruction": f["instruction"], "response": _program(f)}

    return {
        "train": [taught_row(f) for f in parts["train"]],
        "validation": [taught_row(f) for f in parts["validation"]],
        "test": [{"id": f"functions-{i:03d}", "instruction": f["instruction"], "tests": _tests(f)}
                 for i, f in enumerate(parts["test"])],
    }


if __name__ == "__main__":
    sys.exit(generator_main(generate, HERE, SEED, sys.argv[1:]))
