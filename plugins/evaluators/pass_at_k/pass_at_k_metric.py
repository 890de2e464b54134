"""pass@k of candidate programs run against their tests, as a local `evaluate` metric (arXiv:2107.03374).

Loaded by path: ``mergeplug.evaluation.load_metric(<this file>)``. Programs run in the mergeplug ``pass_at_k``
evaluator's best-effort sandbox (module ``sandbox`` beside this file: a separate limited process per program,
no network, writes confined to a temporary folder; not a security boundary, so run untrusted code in a
container), and the estimate is the evaluator's, so the two agree.
"""
import datasets
import evaluate
from mergeplug_plugins.evaluators.pass_at_k.sandbox import Limits
from mergeplug_plugins.evaluators.pass_at_k.scoring import score_programs

_DESCRIPTION = """Unbiased pass@k (Chen et al., arXiv:2107.03374): per problem, with n candidate programs of
which c pass the tests, pass@k = 1 - C(n-c, k)/C(n, k); averaged over the problems with at least k candidates."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per problem, the candidate programs (complete: for HumanEval, prompt + completion).
    references: per problem, the test code run after each candidate (for HumanEval, including the
        `check(<entry_point>)` call).
    k: the k values, default [1, 10].
    timeout: wall-clock seconds per program, default 20.
    workers: programs run at once, default 2.
    memory_mb, cpu_seconds, file_size_mb, max_processes, open_files: the sandbox's limits.
Returns:
    {"pass@<k>": mean over problems, ...}
Examples:
    >>> metric.compute(predictions=[["def f():\\n    return 1"]], references=["assert f() == 1"], k=[1])
    {'pass@1': 1.0}
"""

_CITATION = """@article{chen2021codex, title={Evaluating Large Language Models Trained on Code},
author={Chen, Mark and others}, journal={arXiv preprint arXiv:2107.03374}, year={2021}}"""


class PassAtKMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 10), timeout=20.0, workers=2, memory_mb=1024,
                 cpu_seconds=None, file_size_mb=10, max_processes=1, open_files=64):
        limits = Limits(timeout=float(timeout), cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                        file_size_mb=file_size_mb, max_processes=max_processes, open_files=open_files)
        limits.check()
        ks = sorted(set(k))
        per_k = {value: [] for value in ks}
        for programs, tests in zip(predictions, references):
            scores, _ = score_programs(programs, tests, ks, limits, workers)
            for value in ks:
                if f"pass@{value}" in scores:
                    per_k[value].append(scores[f"pass@{value}"])
        return {f"pass@{value}": sum(values) / len(values) for value, values in per_k.items() if values}
