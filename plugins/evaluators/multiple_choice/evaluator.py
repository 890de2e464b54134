"""Multiple choice by log-likelihood, as lm-evaluation-harness (arXiv:2405.14782) scores it.

Each choice is scored as a continuation of the prompt (one :class:`~mergeplug.evaluation.Loglikelihood` request
per choice; by default the continuation is ``" " + choice``, lm-eval's target delimiter). ``acc``: the most
likely choice is the gold one. ``acc_norm``: the most likely per unit of length is (see :mod:`.scoring` and the
``length_unit`` parameter). MergeBench (arXiv:2505.10833) scores its multilingual domain this way: m_MMLU with
acc, m_ARC and m_HellaSwag with acc/acc_norm, 0-shot.
"""
from __future__ import annotations

import string
from typing import Any

from mergeplug.errors import MergeplugError
from mergeplug.evaluation import Answer, Evaluator, Loglikelihood, LoglikelihoodResult, Request, Scored

from .scoring import LENGTH_UNITS, gold_index, normalisation_length, score_choices

#: lm-evaluation-harness's default ``target_delimiter`` (" ") before the choice's text.
DEFAULT_CONTINUATION = " {choice}"


class MultipleChoice(Evaluator):
    """Metrics ``acc`` and ``acc_norm``; sample fields ``choices`` (list of strings) and ``answer``."""

    metrics = ("acc", "acc_norm")
    required_fields = ("choices", "answer")

    def __init__(self, continuation: str = DEFAULT_CONTINUATION, length_unit: str = "characters", **unknown: Any):
        if unknown:
            raise MergeplugError(
                f"multiple_choice: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: continuation, length_unit"
            )
        if length_unit not in LENGTH_UNITS:
            raise MergeplugError(
                f"multiple_choice: parameter `length_unit` {length_unit!r} must be one of {', '.join(LENGTH_UNITS)}"
            )
        try:
            continuation.format(choice="x", letter="A", index=0)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise MergeplugError(
                f"multiple_choice: parameter `continuation` {continuation!r} is not a format string over "
                f"{{choice}}, {{letter}} and {{index}} ({type(exc).__name__}: {exc})"
            ) from None
        super().__init__(continuation=continuation, length_unit=length_unit)
        self.continuation = continuation
        self.length_unit = length_unit

    def _choices(self, sample: dict) -> list[str]:
        choices = sample.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
            raise MergeplugError(
                f"multiple_choice: the sample's `choices` must be a non-empty list of strings, got {choices!r}; "
                f"check the domain's `columns`"
            )
        if len(choices) > len(string.ascii_uppercase):
            raise MergeplugError(f"multiple_choice: {len(choices)} choices; at most 26 are supported (letters A-Z)")
        return list(choices)

    def _continuations(self, choices: list[str]) -> list[str]:
        return [
            self.continuation.format(choice=choice, letter=string.ascii_uppercase[i], index=i)
            for i, choice in enumerate(choices)
        ]

    def requests(self, sample: dict, prompt: str, generation: dict) -> list[Request]:
        return [Loglikelihood(prompt, text) for text in self._continuations(self._choices(sample))]

    def score(self, sample: dict, answers: list[Answer]) -> Scored:
        choices = self._choices(sample)
        if len(answers) != len(choices) or not all(isinstance(a, LoglikelihoodResult) for a in answers):
            raise MergeplugError(
                f"multiple_choice: expected {len(choices)} log-likelihood results (one per choice), got "
                f"{len(answers)}"
            )
        gold = gold_index(sample.get("answer"), choices)
        lengths = [
            normalisation_length(choice, text, self.length_unit)
            for choice, text in zip(choices, self._continuations(choices))
        ]
        logprobs = [a.logprob for a in answers]
        scores, predicted = score_choices(logprobs, lengths, gold)
        return Scored(scores, {"gold": gold, **predicted, "logprobs": logprobs, "lengths": lengths})
