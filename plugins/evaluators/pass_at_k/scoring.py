"""pass@k: build each completion's program, run it with its tests in the sandbox, estimate pass@k. Pure
functions shared by the evaluator and by the ``evaluate`` metric module ``pass_at_k_metric.py``.

The estimator is Chen et al.'s unbiased one (Codex, arXiv:2107.03374): with n samples of which c pass,
pass@k = 1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which neither
overflows nor loses precision for large n.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from mergeplug.errors import MergeplugError

from .sandbox import Limits, Outcome, run_programs

PROGRAM_MODES = ("prompt+completion", "completion")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_DEFINES_CHECK = re.compile(r"^def\s+check\s*\(", re.MULTILINE)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples with c correct (arXiv:2107.03374)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise MergeplugError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def strip_fence(completion: str) -> str:
    """The code of a Markdown-fenced answer: the first ```python (or ```py) block, else the first fenced block,
    else the text as it is. An unclosed fence runs to the end (the generation was cut). Our choice of rule."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    for language, code in blocks:
        if language.lower() in ("python", "py", "python3"):
            return code
    return blocks[0][1]


def build_program(sample: dict, completion: str, mode: str) -> str:
    """The candidate program: HumanEval's prompt + completion (arXiv:2107.03374), or a whole-program answer."""
    if mode == "completion":
        return strip_fence(completion)
    if mode != "prompt+completion":
        raise MergeplugError(f"pass_at_k: parameter `program` {mode!r} must be one of {', '.join(PROGRAM_MODES)}")
    prompt = sample.get("prompt")
    if not isinstance(prompt, str):
        raise MergeplugError(
            "pass_at_k: program 'prompt+completion' needs the sample's `prompt` (the code the completion "
            "continues); map it in the domain's `columns`, or use program 'completion'"
        )
    # A backend that echoes the prompt must not get it twice.
    return completion if completion.startswith(prompt) else prompt + completion


def build_tests(sample: dict) -> str:
    """The test code, followed by ``check(<entry_point>)`` when it defines ``check`` (HumanEval, EvalPlus)."""
    tests = sample.get("tests")
    if not isinstance(tests, str) or not tests.strip():
        raise MergeplugError("pass_at_k: the sample has no `tests` (Python test code); check the domain's `columns`")
    if not _DEFINES_CHECK.search(tests):
        return tests  # MBPP(+) style: the tests call the function themselves
    entry_point = sample.get("entry_point")
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise MergeplugError(
            f"pass_at_k: the tests define check() but the sample's `entry_point` is {entry_point!r}; map the "
            f"function's name to `entry_point` in the domain's `columns`"
        )
    return f"{tests}\n\ncheck({entry_point})\n"


def score_programs(
    programs: Sequence[str], tests: str, ks: Sequence[int], limits: Limits, workers: int
) -> tuple[dict[str, float], list[Outcome]]:
    """Run every candidate program followed by the tests; pass@k for each k no larger than the number of
    candidates (a larger k has no unbiased estimate), and each program's outcome."""
    outcomes = run_programs([f"{program}\n\n{tests}" for program in programs], limits, workers)
    n, c = len(outcomes), sum(outcome.status == "passed" for outcome in outcomes)
    return {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}, outcomes


def summarise(outcomes: Sequence[Outcome], stderr_chars: int = 500) -> list[dict[str, Any]]:
    """Outcomes as records, with shorter stderr tails (a benchmark keeps thousands of them)."""
    records = []
    for outcome in outcomes:
        record = outcome.as_dict()
        record["stderr"] = record["stderr"][-stderr_chars:]
        records.append(record)
    return records
