"""Generator of the tiny_reversal domain: say a list of words back in reverse order.

Task: "Reverse the order of these words: cold river blue seven" -> "seven blue river cold", for lists of 3 or 4
distinct words out of 48. It is the tiny world's base ability: the tiny base learns it in pretraining (its
training rows join the mixture the base is trained on) and no specialist is trained on it, so a lower score
after finetuning or merging is forgetting, as MergeBench measures it on the base model's general benchmarks
(arXiv:2505.10833).

Why multiple choice: a test row offers four answers for a list never seen in training: the reversed list, the
list as given, the reversed list with its first two words swapped, and the reversed list rotated by one. The
evaluator compares their log-likelihoods (lm-evaluation-harness's acc, arXiv:2405.14782), a smooth measure that
a small loss of skill moves before exact generation would.

Disjoint by construction: word lists are drawn with the seed without repetition and cut into test, validation
and training parts. Regenerate the shipped files with ``python -m mergeplug_plugins.domains.tiny_reversal.generate``.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from mergeplug.tiny import generator_main, split_pool

HERE = Path(__file__).parent
SEED = 16
SIZES = {"test": 200, "validation": 100, "train": 3000}
WORDS = ("red", "blue", "green", "gold", "cold", "warm", "dark", "bright", "river", "stone", "cloud", "field",
         "apple", "bread", "honey", "salt", "one", "two", "three", "seven", "north", "south", "east", "west",
         "run", "sing", "jump", "swim", "cat", "owl", "fox", "bee", "door", "road", "lamp", "ship", "snow", "rain",
         "wind", "fire", "moon", "sun", "star", "sky", "king", "queen", "child", "friend")
INSTRUCTION = "Reverse the order of these words: {words}"


def _lists(rng: random.Random, count: int) -> list[tuple[str, ...]]:
    """``count`` distinct lists of 3 or 4 distinct words."""
    seen: set[tuple[str, ...]] = set()
    while len(seen) < count:
        seen.add(tuple(rng.sample(WORDS, rng.randint(3, 4))))
    return sorted(seen)


def _row(words: tuple[str, ...]) -> dict:
    return {"instruction": INSTRUCTION.format(words=" ".join(words)), "response": " ".join(reversed(words))}


def _choices(words: tuple[str, ...], rng: random.Random) -> tuple[list[str], int]:
    reverse = list(reversed(words))
    swapped = [reverse[1], reverse[0], *reverse[2:]]
    rotated = [*reverse[1:], reverse[0]]
    options = [" ".join(o) for o in (reverse, list(words), swapped, rotated)]
    order = list(range(4))
    rng.shuffle(order)
    return [options[i] for i in order], order.index(0)


def generate(seed: int = SEED, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: instruction/response rows, and four-choice test rows."""
    rng = random.Random(seed)
    sizes = sizes or SIZES
    parts = split_pool(_lists(rng, sum(sizes.values())), sizes, rng)
    test = []
    for i, words in enumerate(parts["test"]):
        choices, answer = _choices(words, rng)
        test.append({"id": f"reversal-{i:03d}", "instruction": INSTRUCTION.format(words=" ".join(words)),
                     "choices": choices, "answer": answer})
    return {"train": [_row(w) for w in parts["train"]], "validation": [_row(w) for w in parts["validation"]],
            "test": test}


if __name__ == "__main__":
    sys.exit(generator_main(generate, HERE, SEED, sys.argv[1:]))
