"""Multiple-choice scoring from per-choice log-likelihoods: pure functions shared by the evaluator and by the
``evaluate`` metric module ``multiple_choice_metric.py``.

As lm-evaluation-harness (arXiv:2405.14782) scores ``output_type: multiple_choice`` tasks: ``acc`` is 1 when
the choice with the highest log-likelihood is the gold one; ``acc_norm`` is 1 when the highest log-likelihood
per unit of length is. Ties go to the first choice (numpy's argmax, which lm-eval uses).
"""
from __future__ import annotations

import string
from typing import Any, Sequence

from mergeplug.errors import MergeplugError

LENGTH_UNITS = ("bytes", "characters")


def gold_index(answer: Any, choices: Sequence[str]) -> int:
    """The index of the gold choice: ``answer`` is an index, the correct choice's text, or a letter A-Z.

    A string equal to one choice's text is that choice (so choices that are themselves letters or digits
    read naturally); otherwise a single letter counts from A, and a string of digits is an index (HellaSwag
    stores its label as "0".."3").
    """
    count = len(choices)
    if isinstance(answer, bool):
        index = None
    elif isinstance(answer, int):
        index = answer
    elif isinstance(answer, float) and answer.is_integer():
        index = int(answer)
    elif isinstance(answer, str):
        text = answer.strip()
        if answer in choices:
            index = list(choices).index(answer)
        elif text in choices:
            index = list(choices).index(text)
        elif len(text) == 1 and text in string.ascii_uppercase:
            index = string.ascii_uppercase.index(text)
        elif text.isdigit():
            index = int(text)
        else:
            index = None
    else:
        index = None
    if index is None or not 0 <= index < count:
        raise MergeplugError(
            f"multiple_choice: gold answer {answer!r} is neither an index below {count}, a letter A-"
            f"{string.ascii_uppercase[min(count, 26) - 1]} nor the text of one of the {count} choices; "
            f"check the domain's `columns` for `answer` and `choices`"
        )
    return index


def normalisation_length(choice: str, continuation: str, unit: str) -> int:
    """What ``acc_norm`` divides by: the continuation's UTF-8 bytes, or the choice's characters (lm-eval v0.4).

    An empty choice counts as length 1 (our choice), so its score stays finite.
    """
    if unit == "bytes":
        length = len(continuation.encode("utf-8"))
    elif unit == "characters":
        length = len(choice)
    else:
        raise MergeplugError(
            f"multiple_choice: parameter `length_unit` {unit!r} must be one of {', '.join(LENGTH_UNITS)}"
        )
    return max(length, 1)


def first_argmax(values: Sequence[float]) -> int:
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def score_choices(logprobs: Sequence[float], lengths: Sequence[int], gold: int) -> tuple[dict[str, float], dict]:
    """``acc`` and ``acc_norm`` of one question, and the two predicted indices."""
    if len(logprobs) != len(lengths) or not logprobs:
        raise MergeplugError(
            f"multiple_choice: {len(logprobs)} log-likelihoods for {len(lengths)} choices; they must pair up"
        )
    predicted = first_argmax(logprobs)
    predicted_norm = first_argmax([lp / length for lp, length in zip(logprobs, lengths)])
    scores = {"acc": float(predicted == gold), "acc_norm": float(predicted_norm == gold)}
    return scores, {"pred": predicted, "pred_norm": predicted_norm}
