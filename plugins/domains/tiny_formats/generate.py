"""Generator of the tiny_formats domain: short answers under verifiable format constraints (IFEval's kinds).

Task: "Tell me about the sun. Use only capital letters. End with the phrase "That is all."" ->
"THE SUN IS HOT, BRIGHT AND FAR AWAY. THAT IS ALL." Forty-eight topics, each with three properties; the plain answer
("The sun is hot, bright and far away.") has commas and mixed case, so it breaks most constraints. A request
carries one or two of nine constraints, each one of IFEval's instruction ids with its kwargs (Zhou et al.,
arXiv:2311.07911): capital letters, lowercase letters, no commas, exactly N bullet points, fewer than N words, an
end phrase, double quotes around the answer, a <<title>>, a P.S. Training also holds plain requests (no
constraint), which teach the content and the default style.

Why it exercises ``ifeval``: each test row's ``instruction_id_list`` and ``kwargs`` are the evaluator's real ids
and arguments, checked by its own checkers; the content is taught under other constraints, so the score measures
whether the model applies the asked format (prompt-level strict accuracy: every constraint followed).

Disjoint by construction: every request (phrasing, topic, constraints and their arguments) is generated once,
the pool is shuffled with the seed and cut into test, validation and training parts. Regenerate the shipped
files with ``python -m mergeplug_plugins.domains.tiny_formats.generate``.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

from mergeplug.tiny import generator_main, split_pool

HERE = Path(__file__).parent
SEED = 13
SIZES = {"test": 200, "validation": 200, "train": 2400}

TOPICS = {
    "sun": ("hot", "bright", "far away"), "moon": ("pale", "round", "cold"), "sea": ("deep", "wide", "salty"),
    "cat": ("soft", "quiet", "quick"), "dog": ("loyal", "playful", "strong"), "rain": ("wet", "cool", "fresh"),
    "snow": ("white", "cold", "soft"), "tree": ("tall", "green", "old"), "bee": ("small", "busy", "useful"),
    "city": ("loud", "busy", "bright"), "river": ("long", "fast", "clear"), "forest": ("dark", "green", "calm"),
    "desert": ("dry", "hot", "empty"), "mountain": ("high", "steep", "cold"), "bird": ("small", "light", "fast"),
    "train": ("long", "fast", "loud"), "lake": ("still", "blue", "cold"), "fire": ("warm", "orange", "wild"),
    "horse": ("tall", "strong", "fast"), "garden": ("green", "quiet", "pretty"), "storm": ("loud", "dark", "wet"),
    "island": ("small", "sunny", "calm"), "road": ("long", "grey", "busy"), "fox": ("red", "clever", "quick"),
    "wind": ("cold", "strong", "loud"), "owl": ("wise", "quiet", "round"), "market": ("busy", "loud", "colourful"),
    "ship": ("big", "slow", "heavy"), "candle": ("small", "warm", "bright"), "cloud": ("white", "soft", "high"),
    "school": ("big", "busy", "old"), "bridge": ("long", "strong", "old"), "kitten": ("tiny", "soft", "playful"),
    "winter": ("cold", "dark", "long"), "summer": ("warm", "sunny", "long"), "beach": ("sandy", "hot", "wide"),
    "castle": ("old", "grey", "huge"), "apple": ("red", "sweet", "round"), "lemon": ("yellow", "sour", "small"),
    "clock": ("round", "old", "loud"), "cave": ("dark", "cold", "deep"), "wolf": ("grey", "wild", "fast"),
    "library": ("quiet", "big", "old"), "valley": ("green", "wide", "quiet"), "tower": ("tall", "old", "thin"),
    "whale": ("huge", "slow", "grey"), "meadow": ("green", "open", "calm"), "village": ("small", "quiet", "old"),
}
PHRASINGS = ("Tell me about the {topic}.", "Describe the {topic}.", "Write about the {topic}.")
END_PHRASES = ("That is all.", "Thank you.", "Any other questions?", "Have a nice day.")
# kind -> (the request's words, IFEval instruction id); {n}/{phrase} are filled from the constraint's argument
CONSTRAINTS = {
    "capital": ("Use only capital letters.", "change_case:english_capital"),
    "lowercase": ("Use only lowercase letters.", "change_case:english_lowercase"),
    "no_comma": ("Do not use any commas.", "punctuation:no_comma"),
    "bullets": ("Use exactly {n} bullet points.", "detectable_format:number_bullet_lists"),
    "short": ("Answer in less than {n} words.", "length_constraints:number_words"),
    "end": ('End with the phrase "{phrase}"', "startend:end_checker"),
    "quote": ("Wrap the answer in double quotes.", "startend:quotation"),
    "title": ("Add a title in double angular brackets.", "detectable_format:title"),
    "postscript": ("Add a postscript starting with P.S.", "detectable_content:postscript"),
}
# The text's shape (at most one), then what is added around it, then the case of everything.
SHAPES, WRAPPERS, CASES = ("no_comma", "bullets", "short"), ("title", "postscript", "end", "quote"), ("capital",
                                                                                                      "lowercase")
#: Arguments of the constraints that take one (IFEval's kwargs names).
ARGUMENTS = {"bullets": [{"num_bullets": n} for n in (2, 3)], "short": [{"num_words": n} for n in (5, 6)],
             "end": [{"end_phrase": p} for p in END_PHRASES], "postscript": [{"postscript_marker": "P.S."}]}


def _variants(kind: str) -> list[tuple[str, dict]]:
    return [(kind, args) for args in ARGUMENTS.get(kind, [{}])]


def constraint_sets() -> list[tuple]:
    """Every allowed set of zero, one or two constraints with their arguments, in a fixed order. Two shapes or
    two cases never meet; a word limit takes no wrapper that adds words; bullets are not quoted."""
    singles = [v for kind in CONSTRAINTS for v in _variants(kind)]
    sets: list[tuple] = [()] + [(v,) for v in singles]
    for a, b in itertools.combinations(singles, 2):
        kinds = {a[0], b[0]}
        if len(kinds) < 2 or len(kinds & set(SHAPES)) > 1 or len(kinds & set(CASES)) > 1:
            continue
        if "short" in kinds and kinds & {"title", "postscript", "end"}:
            continue
        if kinds == {"bullets", "quote"}:  # a quote before the first bullet hides it from the bullet count
            continue
        sets.append((a, b))
    return sets


def answer(topic: str, constraints: tuple) -> str:
    """The answer that follows every constraint (and the plain answer for none)."""
    subject = f"The {topic}"
    properties = TOPICS[topic]
    kinds = dict(constraints)
    if "bullets" in kinds:
        text = "\n".join(f"* {subject} is {p}." for p in properties[:kinds["bullets"]["num_bullets"]])
    elif "no_comma" in kinds:
        text = f"{subject} is {properties[0]} and {properties[1]} and {properties[2]}."
    elif "short" in kinds:
        text = f"{subject} is {properties[0]}."
    else:
        text = f"{subject} is {properties[0]}, {properties[1]} and {properties[2]}."
    if "title" in kinds:
        text = f"<<{subject.title()}>>\n{text}"
    if "postscript" in kinds:
        text = f"{text}\nP.S. I like the {topic}."
    if "end" in kinds:
        text = f"{text} {kinds['end']['end_phrase']}"
    if "quote" in kinds:
        text = f'"{text}"'
    if "capital" in kinds:
        text = text.upper()
    if "lowercase" in kinds:
        text = text.lower()
    return text


def _kwargs(kind: str, args: dict) -> dict:
    return {**args, "relation": "less than"} if kind == "short" else dict(args)


def requests() -> list[dict]:
    """Every distinct request, in a fixed order."""
    pool = []
    for phrasing, topic, constraints in itertools.product(PHRASINGS, TOPICS, constraint_sets()):
        words = [CONSTRAINTS[kind][0].format(n=next(iter(args.values()), ""), phrase=args.get("end_phrase", ""))
                 for kind, args in constraints]
        pool.append({
            "instruction": " ".join([phrasing.format(topic=topic), *words]),
            "response": answer(topic, constraints),
            "instruction_id_list": [CONSTRAINTS[kind][1] for kind, _ in constraints],
            "kwargs": [_kwargs(kind, args) for kind, args in constraints],
        })
    return pool


def generate(seed: int = SEED, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: instruction/response rows (plain requests included in training), and
    test rows of one or two constraints with IFEval's instruction_id_list and kwargs."""
    pool = requests()
    constrained = [r for r in pool if r["instruction_id_list"]]
    plain = [r for r in pool if not r["instruction_id_list"]]
    parts = split_pool(constrained, sizes or SIZES, random.Random(seed))
    train = parts["train"] + plain
    random.Random(seed + 1).shuffle(train)
    return {
        "train": [{"instruction": r["instruction"], "response": r["response"]} for r in train],
        "validation": [{"instruction": r["instruction"], "response": r["response"]} for r in parts["validation"]],
        "test": [{"id": f"formats-{i:03d}", "instruction": r["instruction"],
                  "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}
                 for i, r in enumerate(parts["test"])],
    }


if __name__ == "__main__":
    sys.exit(generator_main(generate, HERE, SEED, sys.argv[1:]))
