"""IFEval's four accuracies (Zhou et al., arXiv:2311.07911) as a local `evaluate` metric module.

Load it by path (evaluate would fetch a name from the hub)::

    metric = mergeplug.evaluation.load_metric(PATH_TO / "ifeval_metric.py")
    metric.compute(predictions=["My answer is yes."],
                   references=[{"instruction_id_list": ["detectable_format:constrained_response"],
                                "kwargs": json.dumps([{}])}])

``kwargs`` is a JSON string of the list of kwargs dicts (one per instruction), since the dicts differ in keys.
It scores through the plugin's evaluator class, so it gives the evaluator's numbers (values only, no stderr).
"""
import datasets
import evaluate
from mergeplug_plugins.evaluators.ifeval.evaluator import IFEval


class IFEvalMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="IFEval: share of prompts (prompt_level_*) and of instructions (instruction_level_*) "
            "followed, strictly and loosely.",
            citation="Zhou et al., Instruction-Following Evaluation for Large Language Models, arXiv:2311.07911",
            inputs_description="predictions: responses; references: {instruction_id_list, kwargs (JSON list)}",
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": {
                    "instruction_id_list": datasets.Sequence(datasets.Value("string")),
                    "kwargs": datasets.Value("string"),
                },
            }),
        )

    def _compute(self, predictions, references, extra_instructions=None):
        evaluator = IFEval(extra_instructions=extra_instructions)
        scored = [evaluator.score(reference, [[prediction]]) for prediction, reference in zip(predictions, references)]
        return {name: metric.value for name, metric in evaluator.aggregate(scored).items()}
