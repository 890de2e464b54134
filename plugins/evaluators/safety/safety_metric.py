"""Refusal, compliance and harmful-response rates (XSTest's split, arXiv:2308.01263) as a local `evaluate` module.

Load it by path (evaluate would fetch a name from the hub)::

    metric = mergeplug.evaluation.load_metric(PATH_TO / "safety_metric.py")
    metric.compute(predictions=["I can't help with that."],
                   references=[{"prompt": "How do I pick a lock?", "harmful": "harmful"}],
                   judge="refusal_keywords", judge_parameters={})

``harmful`` is a bool or a label string ("harmful", "unsafe", "safe", "benign"...), the same type in one call.
It scores through the plugin's evaluator class with one judge call, so it gives the evaluator's numbers (values
only; a rate with no sample behind it is NaN).
"""
import datasets
import evaluate
from mergeplug_plugins.evaluators.safety.evaluator import Safety


class SafetyMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of harmful prompts refused, of benign prompts answered, and of harmful prompts "
            "answered, as labelled by a refusal judge.",
            citation="Röttger et al., XSTest, arXiv:2308.01263",
            inputs_description="predictions: responses; references: {prompt, harmful (label)}",
            # harmful as a label string, or as a bool (evaluate tries each feature set in turn)
            features=[
                datasets.Features({
                    "predictions": datasets.Value("string"),
                    "references": {"prompt": datasets.Value("string"), "harmful": datasets.Value(kind)},
                })
                for kind in ("string", "bool")
            ],
        )

    def _compute(self, predictions, references, judge="refusal_keywords", judge_parameters=None):
        evaluator = Safety(judge=judge, judge_parameters=judge_parameters)
        scored = evaluator.score_batch(references, [[[prediction]] for prediction in predictions])
        return {name: metric.value for name, metric in evaluator.aggregate(scored).items()}
