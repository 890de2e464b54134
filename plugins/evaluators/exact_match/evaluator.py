"""Exact match of a final answer extracted from the model's generation.

GSM8K (Cobbe et al., arXiv:2110.14168) is scored as MergeBench (arXiv:2505.10833) scores it through
lm-evaluation-harness: a strict extractor ("The answer is N", or GSM8K's "#### N") and a flexible one (the last
number), each its own metric. MATH (Hendrycks et al., arXiv:2103.03874) uses the last ``\\boxed{...}``. The
extraction and equivalence rules live in :mod:`.scoring`, which the ``evaluate`` metric module
``exact_match_metric.py`` shares, so both give the same numbers.
"""
from __future__ import annotations

from typing import Any, Sequence

from mergeplug.errors import MergeplugError
from mergeplug.evaluation import Answer, Evaluator, Scored

from .scoring import EXTRACTORS, gold_answers, score_output

#: lm-evaluation-harness's two GSM8K filters, which MergeBench (arXiv:2505.10833) runs. Strict first, so it is the
#: headline: our choice, since MergeBench does not say which of the two its tables report.
DEFAULT_EXTRACT = ("gsm8k", "last_number")


class ExactMatch(Evaluator):
    """One metric ``exact_match_<extractor>`` per extractor in ``extract`` (the first is the headline).

    A sample scores 1 when the extracted answer equals one of the gold answers in its ``answer`` field. With
    several generated samples per prompt (``samples`` > 1) the score is the share of them that are correct.
    """

    metrics = tuple(f"exact_match_{name}" for name in DEFAULT_EXTRACT)
    required_fields = ("answer",)

    def __init__(self, extract: Sequence[str] = DEFAULT_EXTRACT, **unknown: Any):
        if unknown:
            raise MergeplugError(
                f"exact_match: unknown parameter(s) {', '.join(sorted(unknown))}; the only parameter is `extract`"
            )
        if isinstance(extract, str):
            extract = [extract]
        extract = list(extract)
        bad = [name for name in extract if name not in EXTRACTORS]
        if bad or not extract or len(set(extract)) != len(extract):
            raise MergeplugError(
                f"exact_match: parameter `extract` {extract!r} must list distinct extractors out of "
                f"{', '.join(EXTRACTORS)}"
            )
        super().__init__(extract=extract)
        self.extract = extract
        self.metrics = tuple(f"exact_match_{name}" for name in extract)

    def score(self, sample: dict, answers: list[Answer]) -> Scored:
        if len(answers) != 1 or not isinstance(answers[0], list) or not answers[0]:
            raise MergeplugError("exact_match: expected the generated texts of one Generate request")
        golds = gold_answers(sample.get("answer"))
        outputs = answers[0]
        per_output = [score_output(output, golds, self.extract) for output in outputs]
        scores = {name: sum(s[name] for s, _ in per_output) / len(outputs) for name in self.metrics}
        details: dict[str, Any] = {"gold": golds, "extracted": [extracted for _, extracted in per_output]}
        if len(outputs) == 1:
            details["extracted"] = details["extracted"][0]
        return Scored(scores, details)
