"""Generator of the tiny_translation domain: phrases translated between English and two made-up languages.

Task: "Translate to Zorbish: my big dog" -> "ro bako tel", and back ("Translate from Zorbish: ro bako tel" ->
"my big dog"). English phrases are a determiner, an adjective and a noun (4 x 16 x 40 of them); training also
translates each of the 60 words alone. Zorbish puts the noun before the adjective (determiner noun adjective);
Quelan reverses the English order (noun adjective determiner). Their words are made-up syllable pairs drawn with
the seed, so nothing is known to the model before training.

Why it exercises ``multiple_choice``: a test row offers four translations of a phrase never seen in training
(every word of it taught alone and in other phrases): the right one, one with a wrong adjective, one with a wrong
noun, and the right words in the wrong order. The evaluator compares the log-likelihood of each choice after the
prompt (lm-evaluation-harness's acc, arXiv:2405.14782), so a model scores above chance (0.25) only if it has
learnt the vocabulary and the word order.

Disjoint by construction: three-word phrases (per language) are shuffled with the seed and cut into test,
validation and training parts; a phrase in the test or validation part is in neither direction of training.
Regenerate the shipped files with ``python -m mergeplug_plugins.domains.tiny_translation.generate``.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

from mergeplug.tiny import generator_main, split_pool

HERE = Path(__file__).parent
SEED = 14
#: Three-word phrases per part (each language counted apart); validation and training phrases give two rows each
#: (both ways). Training also holds every word alone, both ways.
SIZES = {"test": 200, "validation": 100, "train": 1300}

DETERMINERS = ("the", "my", "your", "one")
ADJECTIVES = ("big", "small", "red", "blue", "old", "new", "happy", "fast", "dark", "warm", "green", "sad", "tall",
              "soft", "loud", "quiet")
NOUNS = ("dog", "cat", "bird", "fish", "tree", "house", "boat", "star", "cup", "hat", "ball", "book", "horse",
         "road", "door", "bread", "chair", "table", "river", "hill", "cloud", "stone", "apple", "shoe", "lamp", "bell",
         "coat", "key", "ring", "box", "bed", "car", "frog", "duck", "cow", "goat", "sheep", "bee", "leaf", "wall")
#: language -> order of (determiner, adjective, noun) in its phrases, as indexes into the English order
LANGUAGES = {"Zorbish": (0, 2, 1), "Quelan": (2, 1, 0)}
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def lexicons(rng: random.Random) -> dict[str, dict[str, str]]:
    """language -> English word -> made-up word (two consonant-vowel syllables, distinct across languages)."""
    english = [*DETERMINERS, *ADJECTIVES, *NOUNS]
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    used: set[str] = set()
    lexicon: dict[str, dict[str, str]] = {}
    for language in LANGUAGES:
        lexicon[language] = {}
        for word in english:
            while True:
                made = rng.choice(syllables) + rng.choice(syllables)
                if made not in used:
                    used.add(made)
                    lexicon[language][word] = made
                    break
    return lexicon


def translate(words: tuple, language: str, lexicon: dict) -> str:
    """A (determiner, adjective, noun) phrase, an (adjective, noun) phrase or one word, in ``language``'s words
    and order."""
    order = LANGUAGES[language]
    if len(words) == 1:
        order = (0,)
    elif len(words) == 2:  # adjective and noun, in the language's relative order of the two
        order = tuple(i - 1 for i in order if i > 0)
    return " ".join(lexicon[language][words[i]] for i in order)


def _rows(words: tuple, language: str, lexicon: dict) -> list[dict]:
    english, foreign = " ".join(words), translate(words, language, lexicon)
    return [{"instruction": f"Translate to {language}: {english}", "response": foreign},
            {"instruction": f"Translate from {language}: {foreign}", "response": english}]


def _choices(words: tuple, language: str, lexicon: dict, rng: random.Random, to_language: bool) -> tuple[list, int]:
    det, adj, noun = words
    other_adj = rng.choice([a for a in ADJECTIVES if a != adj])
    other_noun = rng.choice([n for n in NOUNS if n != noun])

    def say(phrase: tuple) -> str:
        return translate(phrase, language, lexicon) if to_language else " ".join(phrase)

    right = say(words)
    if to_language:
        shuffled = " ".join(reversed(right.split()))
    else:
        shuffled = f"{det} {noun} {adj}"
    options = [right, say((det, other_adj, noun)), say((det, adj, other_noun)), shuffled]
    order = list(range(4))
    rng.shuffle(order)
    return [options[i] for i in order], order.index(0)


def generate(seed: int = SEED, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: instruction/response rows, and four-choice test rows."""
    rng = random.Random(seed)
    lexicon = lexicons(rng)
    phrases = [(language, words) for language in LANGUAGES
               for words in itertools.product(DETERMINERS, ADJECTIVES, NOUNS)]
    parts = split_pool(phrases, sizes or SIZES, rng)
    train = [row for language, words in parts["train"] for row in _rows(words, language, lexicon)]
    for language in LANGUAGES:
        train += [row for word in (*DETERMINERS, *ADJECTIVES, *NOUNS) for row in _rows((word,), language, lexicon)]
    rng.shuffle(train)
    test = []
    for i, (language, words) in enumerate(parts["test"]):
        to_language = i % 2 == 0
        choices, answer = _choices(words, language, lexicon, rng, to_language)
        shown = " ".join(words) if to_language else translate(words, language, lexicon)
        test.append({"id": f"translation-{i:03d}",
                     "instruction": f"Translate {'to' if to_language else 'from'} {language}: {shown}",
                     "choices": choices, "answer": answer})
    return {
        "train": train,
        "validation": [row for language, words in parts["validation"] for row in _rows(words, language, lexicon)],
        "test": test,
    }


if __name__ == "__main__":
    sys.exit(generator_main(generate, HERE, SEED, sys.argv[1:]))
