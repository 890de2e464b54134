"""Exact match of extracted final answers, as a local `evaluate` metric (GSM8K arXiv:2110.14168, MATH arXiv:2103.03874).

Loaded by path: ``mergeplug.evaluation.load_metric(<this file>)``. The extraction and equivalence rules are
the ones the mergeplug ``exact_match`` evaluator uses (module ``scoring`` beside this file), so the two agree.
"""
import datasets
import evaluate
from mergeplug_plugins.evaluators.exact_match.scoring import gold_answers, score_output

_DESCRIPTION = """Share of predictions whose extracted final answer equals one of the references' acceptable
answers. One value per extractor: exact_match_gsm8k (strict "The answer is N" / "#### N"), exact_match_last_number
(the last number), exact_match_boxed (the last \\boxed{...}), exact_match_none (the whole prediction)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of lists of acceptable gold answers (a GSM8K worked solution is reduced to what follows
        its last '####').
    extract: extractor names, default ["gsm8k", "last_number"].
Returns:
    {"exact_match_<extractor>": share of correct predictions, ...}
Examples:
    >>> metric.compute(predictions=["... The answer is 18."], references=[["18"]])
    {'exact_match_gsm8k': 1.0, 'exact_match_last_number': 1.0}
"""

_CITATION = """@article{cobbe2021gsm8k, title={Training Verifiers to Solve Math Word Problems},
author={Cobbe, Karl and others}, journal={arXiv preprint arXiv:2110.14168}, year={2021}}
@article{hendrycks2021math, title={Measuring Mathematical Problem Solving With the MATH Dataset},
author={Hendrycks, Dan and others}, journal={arXiv preprint arXiv:2103.03874}, year={2021}}"""


class ExactMatchMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, extract=("gsm8k", "last_number")):
        extract = list(extract)
        totals = {f"exact_match_{name}": 0.0 for name in extract}
        for prediction, reference in zip(predictions, references):
            scores, _ = score_output(prediction, gold_answers(reference), extract)
            for name, value in scores.items():
                totals[name] += value
        count = max(len(predictions), 1)
        return {name: total / count for name, total in totals.items()}
