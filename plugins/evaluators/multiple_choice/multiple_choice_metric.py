"""Multiple-choice accuracy from per-choice log-likelihoods, as a local `evaluate` metric (lm-eval, arXiv:2405.14782).

Loaded by path: ``mergeplug.evaluation.load_metric(<this file>)``. The scoring is the mergeplug
``multiple_choice`` evaluator's (module ``scoring`` beside this file), so the two agree.
"""
import datasets
import evaluate
from mergeplug_plugins.evaluators.multiple_choice.scoring import score_choices

_DESCRIPTION = """acc: share of questions where the choice with the highest log-likelihood is the gold one.
acc_norm: the same with each log-likelihood divided by its choice's length (given as `lengths`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per question, the log-likelihood of each choice.
    references: per question, the gold choice's index.
    lengths: per question, each choice's normalisation length (UTF-8 bytes of the continuation, or
        characters of the choice); without it only acc is returned.
Returns:
    {"acc": ..., "acc_norm": ...}
Examples:
    >>> metric.compute(predictions=[[-4.0, -6.0]], references=[1], lengths=[[2, 10]])
    {'acc': 0.0, 'acc_norm': 1.0}
"""

_CITATION = """@article{biderman2024lessons, title={Lessons from the Trenches on Reproducible Evaluation of
Language Models}, author={Biderman, Stella and others}, journal={arXiv preprint arXiv:2405.14782}, year={2024}}"""


class MultipleChoiceMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, lengths=None):
        count = max(len(predictions), 1)
        if lengths is None:
            lengths_or_ones = [[1] * len(logprobs) for logprobs in predictions]
        else:
            lengths_or_ones = lengths
        totals = {"acc": 0.0, "acc_norm": 0.0}
        for logprobs, gold, question_lengths in zip(predictions, references, lengths_or_ones):
            scores, _ = score_choices(logprobs, question_lengths, gold)
            for name, value in scores.items():
                totals[name] += value
        results = {name: total / count for name, total in totals.items()}
        if lengths is None:
            del results["acc_norm"]
        return results
