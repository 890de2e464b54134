"""IFEval (Zhou et al., arXiv:2311.07911): does the response follow every verifiable instruction of its prompt?

Sample fields: ``instruction_id_list`` (ids such as ``"punctuation:no_comma"``) and ``kwargs`` (one dict per
instruction, None values ignored; a JSON string of that list is accepted too). One greedy response per prompt,
as the paper evaluates. Each instruction is checked strictly (the response as is) and loosely (any of the paper's
eight variants passes, :func:`~.instructions.loose_variants`).

Metrics (the paper's four, §3):
- ``prompt_level_strict`` / ``prompt_level_loose``: share of prompts whose instructions are all followed; the
  standard error is that of a mean of 0/1 values.
- ``instruction_level_strict`` / ``instruction_level_loose``: followed instructions / all instructions, a
  micro-average over instructions (a prompt with three instructions weighs three times one with one). Its
  standard error is that of a ratio estimator over prompts (delta method, SE = sqrt(Σ(y_i − R·x_i)² /
  (n(n−1))) / x̄ with y_i followed and x_i given instructions of prompt i): instructions of one prompt share a
  response, so treating them as independent 0/1 values would understate it. ``n`` counts instructions.

The same numbers come from the local `evaluate` module ``ifeval_metric.py`` (it scores through this class).
"""
from __future__ import annotations

import importlib
import json
import math
from typing import Any, Mapping, Sequence

from mergeplug.errors import MergeplugError
from mergeplug.evaluation import Evaluator, Metric, Scored, mean_with_stderr, single_response

from .instructions import INSTRUCTIONS, Checker, bind_kwargs, follows

#: Why a sample with several answers is refused.
ONE_RESPONSE = ("IFEval scores exactly one response per prompt (greedy, as arXiv:2311.07911); set samples: 1 in the "
                "benchmark's generation")


class IFEval(Evaluator):
    metrics = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")
    required_fields = ("instruction_id_list", "kwargs")

    def __init__(self, extra_instructions: Mapping[str, str] | None = None):
        super().__init__(extra_instructions=dict(extra_instructions or {}))
        self.checkers: dict[str, Checker] = {**INSTRUCTIONS, **_import_checkers(extra_instructions or {})}

    def follows(self, sample: dict, response: str) -> tuple[list[bool], list[bool]]:
        """Per instruction of ``sample``: followed strictly, followed loosely."""
        ids, kwargs = _instructions_of(sample)
        for instruction_id, given in zip(ids, kwargs):  # reject bad kwargs even when the response is blank
            bind_kwargs(instruction_id, given, self.checkers)
        strict = [follows(i, response, k, checkers=self.checkers) for i, k in zip(ids, kwargs)]
        loose = [ok or follows(i, response, k, loose=True, checkers=self.checkers)
                 for ok, i, k in zip(strict, ids, kwargs)]
        return strict, loose

    def score(self, sample: dict, answers: list) -> Scored:
        strict, loose = self.follows(sample, single_response(answers, ONE_RESPONSE))
        return Scored(
            {
                "prompt_level_strict": float(all(strict)),
                "prompt_level_loose": float(all(loose)),
                "instruction_level_strict": sum(strict) / len(strict),
                "instruction_level_loose": sum(loose) / len(loose),
            },
            {"instruction_id_list": list(sample["instruction_id_list"]), "strict": strict, "loose": loose},
        )

    def aggregate(self, scored: Sequence[Scored]) -> dict[str, Metric]:
        # records reloaded from disk keep details; the micro-average needs each prompt's per-instruction results
        if any(not isinstance(s.details.get(mode), list) for s in scored for mode in ("strict", "loose")):
            raise MergeplugError("IFEval aggregate: a scored sample lacks details['strict'/'loose'] (per-instruction "
                                 "results); score the samples again")
        result = {}
        for mode in ("strict", "loose"):
            result[f"prompt_level_{mode}"] = mean_with_stderr([s.scores[f"prompt_level_{mode}"] for s in scored])
        for mode in ("strict", "loose"):
            result[f"instruction_level_{mode}"] = ratio_with_stderr(
                [sum(s.details[mode]) for s in scored], [len(s.details[mode]) for s in scored]
            )
        return {name: result[name] for name in self.metrics}


def ratio_with_stderr(followed: Sequence[float], given: Sequence[float]) -> Metric:
    """Σ followed / Σ given and the ratio estimator's standard error over prompts (delta method)."""
    n, total = len(given), math.fsum(given)
    if n == 0 or total == 0:
        return Metric(math.nan, None, 0)
    ratio = math.fsum(followed) / total
    if n == 1:
        return Metric(ratio, None, int(total))
    residuals = math.fsum((y - ratio * x) ** 2 for y, x in zip(followed, given))
    return Metric(ratio, math.sqrt(residuals / (n * (n - 1))) / (total / n), int(total))


def _instructions_of(sample: dict) -> tuple[list[str], list[Any]]:
    ids, kwargs = sample["instruction_id_list"], sample.get("kwargs")
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    if not isinstance(ids, (list, tuple)) or not ids:
        raise MergeplugError(f"IFEval sample: instruction_id_list must be a non-empty list of ids, got {ids!r}")
    kwargs = [None] * len(ids) if kwargs is None else list(kwargs)
    if len(kwargs) != len(ids):
        raise MergeplugError(
            f"IFEval sample: {len(ids)} instruction ids but {len(kwargs)} kwargs dicts; give one dict per instruction"
        )
    return list(ids), kwargs



def _import_checkers(targets: Mapping[str, str]) -> dict[str, Checker]:
    checkers = {}
    for instruction_id, target in targets.items():
        if instruction_id in INSTRUCTIONS:
            raise MergeplugError(
                f"ifeval extra_instructions: {instruction_id!r} is a built-in instruction; give yours another id"
            )
        module_name, _, attr = str(target).partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - any failure is the target's; the user needs its name
            raise MergeplugError(
                f"ifeval extra_instructions: {instruction_id!r}: cannot load {target!r} (want 'module:function'): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not callable(obj):
            raise MergeplugError(f"ifeval extra_instructions: {instruction_id!r}: {target!r} is not a function")
        checkers[instruction_id] = obj
    return checkers
