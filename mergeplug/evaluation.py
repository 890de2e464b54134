"""The evaluator contract: what an evaluator plugin implements, and the requests it sends to a model runner.

An evaluator turns one benchmark sample into requests (:class:`Generate` or :class:`Loglikelihood`), a
runner backend answers them in length-sorted batches, and the evaluator scores the answers. The evaluator
never touches a model, so the same evaluator runs on the transformers backend, on vLLM, or on hand-written
outputs in a test. No torch here.

An evaluator plugin registers a subclass of :class:`Evaluator`::

    register("exact_match", "mergeplug_plugins.evaluators.exact_match.evaluator:ExactMatch",
             description="...", parameters=HERE / "parameters.json", reference="arXiv:2110.14168")

A benchmark's ``evaluator_parameters`` (checked against that schema, defaults filled in) are passed to the
constructor as keyword arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence, Union

from .errors import MergeplugError


# --- what an evaluator asks of the model -------------------------------------------------------------------
@dataclass(frozen=True)
class Generate:
    """Generate ``samples`` continuations of ``prompt``; each answer is cut before the first stop sequence.

    ``temperature`` 0 is greedy decoding (then ``samples`` is normally 1). Sampling is seeded with ``seed``
    so that a rerun gives the same outputs on the same backend and device.
    """

    prompt: str
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    samples: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Loglikelihood:
    """Score ``continuation`` after ``context``: log p(continuation | context), summed over its tokens."""

    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float  #: sum of the continuation tokens' log-probabilities
    tokens: int  #: number of continuation tokens
    greedy: bool  #: whether every continuation token was the model's argmax


Request = Union[Generate, Loglikelihood]
#: A runner's answer to a request: the list of ``samples`` texts for :class:`Generate`, a
#: :class:`LoglikelihoodResult` for :class:`Loglikelihood`.
Answer = Union[list, LoglikelihoodResult]


# --- what an evaluator returns ---------------------------------------------------------------------------
@dataclass
class Scored:
    """One sample's scores (metric name to number) and details worth keeping in the per-sample record.

    A metric that does not apply to a sample is left out (a safety benchmark scores ``refused`` only on
    harmful prompts): the default aggregation averages each metric over the samples that have it.
    """

    scores: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """An aggregate: the value, its standard error (None when undefined) and the number of samples behind it."""

    value: float
    stderr: float | None
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "n": self.n}


def mean_with_stderr(values: Sequence[float]) -> Metric:
    """The mean and its standard error, sqrt(sample variance / n) with Bessel's correction, as lm-eval reports."""
    n = len(values)
    if n == 0:
        return Metric(math.nan, None, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Metric(mean, None, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(mean, math.sqrt(variance / n), n)


class Evaluator:
    """Base class of evaluator plugins.

    Subclasses set :attr:`metrics` (names of the aggregate metrics, the headline first) and implement
    :meth:`score`; they override :meth:`requests` when they need more than one greedy generation of the
    prompt (several samples, log-likelihoods of choices), and :meth:`aggregate` when a metric is not a
    per-sample mean (IFEval's instruction-level accuracy is a micro-average over instructions).
    """

    #: Aggregate metric names, headline first (``mergeplug show`` lists them).
    metrics: ClassVar[tuple[str, ...]] = ()
    #: Sample fields the evaluator reads besides the prompt's (checked before any model runs).
    required_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **parameters: Any):
        self.parameters = parameters

    def requests(self, sample: dict, prompt: str, generation: dict) -> list[Request]:
        """What to ask the model for ``sample``; ``prompt`` is rendered by the domain, ``generation`` holds the
        benchmark's generation settings (max_new_tokens, stop, temperature, top_p, samples)."""
        return [Generate(prompt, **_generation_kwargs(generation))]

    def score(self, sample: dict, answers: list[Answer]) -> Scored:
        """Score the answers to :meth:`requests` (same order)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def score_batch(self, samples: Sequence[dict], answers: Sequence[list[Answer]]) -> list[Scored]:
        """Score many samples at once; the evaluate loop always calls this. Override it when scoring is cheaper
        in bulk (a judge model labelling a whole batch); by default, :meth:`score` per sample."""
        return [self.score(sample, got) for sample, got in zip(samples, answers)]

    def aggregate(self, scored: Sequence[Scored]) -> dict[str, Metric]:
        """Each metric's mean over the samples that have it, with its standard error."""
        names = list(self.metrics) or sorted({k for s in scored for k in s.scores})
        return {name: mean_with_stderr([s.scores[name] for s in scored if name in s.scores]) for name in names}


def single_response(answers: list, problem: str) -> str:
    """The one text answered to a single-sample :class:`Generate`; anything else is a
    :class:`~mergeplug.errors.MergeplugError` that says ``problem`` (what the evaluator needs and how to set it)."""
    texts = answers[0] if answers else None
    if isinstance(texts, str):
        return texts
    if not isinstance(texts, (list, tuple)) or len(texts) != 1 or not isinstance(texts[0], str):
        raise MergeplugError(f"{problem} (got {texts!r:.80})")
    return texts[0]


def _generation_kwargs(generation: dict) -> dict:
    keys = ("max_new_tokens", "temperature", "top_p", "samples", "seed")
    kwargs = {k: generation[k] for k in keys if k in generation}
    if "stop" in generation:
        kwargs["stop"] = tuple(generation["stop"])
    return kwargs


# --- judges ------------------------------------------------------------------------------------------------
class Judge:
    """Base class of judge plugins: label responses, e.g. whether each one refuses.

    A judge registered as ``register("refusal_keywords", ...)`` is chosen by an evaluator's parameter (the
    safety evaluator's ``judge``); a classifier model (WildGuard, say) is a judge plugin that loads its model
    in ``__init__``.
    """

    def __init__(self, **parameters: Any):
        self.parameters = parameters

    def refusals(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        """For each (prompt, response) pair, whether the response refuses to help."""
        raise NotImplementedError(f"{type(self).__name__} must implement refusals()")


#: (id of the component, parameters) -> (the component, kept alive so its id is never reused, and its judge)
_JUDGES: dict[tuple[int, str], tuple[Any, Judge]] = {}


def load_judge(name: str, **parameters: Any) -> Judge:
    """The judge component ``name`` (``mergeplug list --kind judge``), built with ``parameters``.

    One instance per component and parameters for the process: a classifier-model judge is loaded once, not
    once per benchmark that uses it.
    """
    import json

    from .plugins import get_registry
    from .schema import problems, with_defaults

    component = get_registry().get("judge", name)
    key = (id(component), json.dumps(parameters, sort_keys=True, default=str))
    if key not in _JUDGES:
        lines = problems(parameters, component.parameters, source=f"judge {name!r}", prefix=["judge_parameters"])
        if lines:
            raise MergeplugError(*lines)
        _JUDGES[key] = (component, component.load()(**with_defaults(parameters, component.parameters)))
    return _JUDGES[key][1]


# --- metrics as local `evaluate` modules -------------------------------------------------------------------
_METRICS: dict[str, Any] = {}


def load_metric(path: str | Any) -> Any:
    """An ``evaluate`` metric module loaded from its local file (``evaluate.load(name)`` would need the hub).

    Loaded once per process. Such a file must put each ``import`` on its own line: evaluate's import parser
    reads the file as text.
    """
    key = str(path)
    if key not in _METRICS:
        import evaluate

        try:
            _METRICS[key] = evaluate.load(key)
        except Exception as exc:  # noqa: BLE001 - evaluate raises many kinds; the path is what the user needs
            raise MergeplugError(f"{key}: cannot load the evaluate metric module: {type(exc).__name__}: {exc}") from exc
    return _METRICS[key]
