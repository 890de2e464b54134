"""pass@k of generated code against its tests, run in a best-effort sandbox.

The coding domain of MergeBench (arXiv:2505.10833) reports pass@1 and pass@10 on HumanEval+ and MBPP+, whose
tests come from EvalPlus (arXiv:2305.01210), with 10 samples per problem. Each sampled completion becomes a
program (HumanEval's prompt + completion, or a whole program taken out of a Markdown fence), runs with the
problem's tests in a separate limited process (:mod:`.sandbox`: read its docstring before evaluating untrusted
models), and pass@k is Chen et al.'s unbiased estimate (arXiv:2107.03374) from the number that pass.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from mergeplug.errors import MergeplugError
from mergeplug.evaluation import Answer, Evaluator, Scored

from .sandbox import Limits, check_sandbox
from .scoring import PROGRAM_MODES, build_program, build_tests, score_programs, summarise

#: pass@1 and pass@10, as MergeBench reports for HumanEval+ and MBPP+ (arXiv:2505.10833).
DEFAULT_K = (1, 10)
#: bigcode-evaluation-harness's timeout for HumanEval+ (20 s; its MBPP+ task uses 10 s), whose many EvalPlus
#: tests need more than HumanEval's 3 s.
DEFAULT_TIMEOUT = 20.0


class PassAtK(Evaluator):
    """Metrics ``pass@<k>`` for each k in ``k`` up to the number of samples; sample fields ``prompt``,
    ``tests`` and, when the tests define ``check``, ``entry_point``.

    Each sample's programs run in parallel, ``workers`` at a time. The first call checks that the sandbox can
    run an empty program, so a broken interpreter set-up is one clear error rather than a score of 0.
    """

    metrics = tuple(f"pass@{k}" for k in DEFAULT_K)
    required_fields = ("prompt", "tests")

    def __init__(
        self,
        program: str = "prompt+completion",
        k: Sequence[int] = DEFAULT_K,
        timeout: float = DEFAULT_TIMEOUT,
        workers: int = 2,
        memory_mb: int = 1024,
        cpu_seconds: Optional[int] = None,
        file_size_mb: int = 10,
        max_processes: int = 1,
        open_files: int = 64,
        **unknown: Any,
    ):
        if unknown:
            raise MergeplugError(
                f"pass_at_k: unknown parameter(s) {', '.join(sorted(unknown))}; known: program, k, timeout, "
                f"workers, memory_mb, cpu_seconds, file_size_mb, max_processes, open_files"
            )
        if program not in PROGRAM_MODES:
            raise MergeplugError(
                f"pass_at_k: parameter `program` {program!r} must be one of {', '.join(PROGRAM_MODES)}"
            )
        if isinstance(k, int):
            k = [k]
        if not k or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in k):
            raise MergeplugError(f"pass_at_k: parameter `k` {k!r} must be a list of positive integers")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise MergeplugError(f"pass_at_k: parameter `workers` {workers!r} must be a positive integer")
        self.limits = Limits(timeout=float(timeout), cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                             file_size_mb=file_size_mb, max_processes=max_processes, open_files=open_files)
        self.limits.check()
        super().__init__(program=program, k=list(k), timeout=timeout, workers=workers, memory_mb=memory_mb,
                         cpu_seconds=cpu_seconds, file_size_mb=file_size_mb, max_processes=max_processes,
                         open_files=open_files)
        self.program = program
        self.ks = sorted(set(k))
        self.workers = workers
        self.metrics = tuple(f"pass@{v}" for v in self.ks)
        self._sandbox_checked = False

    def score(self, sample: dict, answers: list[Answer]) -> Scored:
        if len(answers) != 1 or not isinstance(answers[0], list) or not answers[0]:
            raise MergeplugError("pass_at_k: expected the generated samples of one Generate request")
        if not self._sandbox_checked:
            check_sandbox(self.limits)
            self._sandbox_checked = True
        programs = [build_program(sample, completion, self.program) for completion in answers[0]]
        scores, outcomes = score_programs(programs, build_tests(sample), self.ks, self.limits, self.workers)
        passed = sum(outcome.status == "passed" for outcome in outcomes)
        return Scored(scores, {"n": len(outcomes), "passed": passed, "results": summarise(outcomes)})
