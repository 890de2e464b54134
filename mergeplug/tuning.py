"""``mergeplug tune``: search a merger's coefficients for the best mean normalised performance.

A tune recipe (``kind: tune``, ``schemas/tune.schema.json``) holds a merge recipe (inline under ``merge:``, or
the path of a merge recipe file), a ``search:`` block (the strategy plugin, ``trials``, ``seed`` and the
``space``) and an ``objective:`` block. Each trial builds the merge recipe with the trial's values, checks it
like any merge recipe, merges into ``OUT/.work``, scores the merged model and deletes it.

Objective (MergeBench's guideline, arXiv:2505.10833): the mean over the models' domains of the normalised
score score(merged, d) / score(specialist_d, d), where specialist_d is the recipe's model whose ``domain:`` is d
(scored once, cached in ``OUT/specialists.json``). A model's score on a domain is, with ``measure:
likelihood`` (the default), exp(Σ log p(response | prompt) / Σ response tokens) over ``limit`` rows of the
domain's validation set (default 200, the first rows after a seed-42 shuffle as MergeBench draws its
statistics samples, i.e. ``datasets.Dataset.shuffle(seed=42)``'s order), each rendered like a training example
(:func:`mergeplug.data.render_training_example`). That is 1 / perplexity of the responses: positive, higher is
better, and equal for two identical models. With ``measure: benchmarks`` it is the domain score of
:func:`mergeplug.evaluate_models.evaluate_models` (the weighted mean headline metric of the domain's
benchmarks, ``limit`` samples each); those are test splits unless ``data:`` gives held-out files, which we
warn about. Tuning coefficients on validation data is how task arithmetic picks λ (arXiv:2212.04089).

Files in ``OUT``: ``trials.jsonl`` (one line per trial, appended as trials finish), ``trials.md`` (the table,
best first), ``best_recipe.yaml`` (a merge recipe with the best values, for ``mergeplug merge``), ``tune.json``
(settings and summary), ``specialists.json`` (cached specialist scores), ``best_model/`` (with ``keep``).

Resume: a rerun into the same ``OUT`` replays the strategy; a proposal whose parameters (their hash) are
already recorded is not merged again. The merge recipe (and its input models' files) and the objective are
recorded in ``tune.json``; a rerun with other ones is refused, naming what changed, unless ``force`` (the old
trials are then discarded). The search space, strategy and trial count may change between runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from .atomic import write_json
from .errors import MergeplugError
from .schema import format_path

#: Validation rows scored per domain (our choice: a few minutes per trial on a 3B model; MergeBench's
#: statistics use 1,000 rows, arXiv:2505.10833).
DEFAULT_LIMIT = 200
TRIALS_FILE = "trials.jsonl"
SUMMARY_FILE = "tune.json"
SPECIALISTS_FILE = "specialists.json"
TABLE_FILE = "trials.md"
BEST_RECIPE_FILE = "best_recipe.yaml"
BEST_MODEL_DIR = "best_model"
WORK_DIR = ".work"
#: Columns of validation rows given as local files for a domain that declares no validation set.
LOCAL_VALIDATION_COLUMNS = {"instruction": "instruction", "response": "response"}


# --- the strategy contract ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a list of ``values``, or a range [``low``, ``high``] (log-uniform when ``log``).

    ``name`` is the space's key (``lambda``, ``models.1.weight``); ``integer`` is true when the parameter's
    schema types it as an integer (a range then yields integers).
    """

    name: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.values is None


@dataclass
class Trial:
    """One evaluated point of the search, as recorded in ``trials.jsonl``."""

    number: int
    parameters: dict
    key: str
    status: str = "ok"  # ok | failed
    objective: float | None = None
    scores: dict = field(default_factory=dict)  # domain -> the merged model's score
    normalised: dict = field(default_factory=dict)  # domain -> score / specialist's score
    merge_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    error: str | None = None

    def record(self) -> dict:
        return asdict(self)


class SearchStrategy:
    """Base class of search-strategy plugins (kind ``strategy``).

    Built once per search with the ordered ``space`` (a list of :class:`Dimension`), the search ``seed``, the
    strategy's own ``parameters`` (its schema's defaults filled in) and ``trials``, the most trials the search
    runs (None when the recipe gives none). :meth:`propose` is called with every trial so far (failed ones
    have ``objective`` None) and returns the next point, ``{dimension name: value}``, or None when the
    strategy is done. It must be deterministic in its inputs: a resumed search replays it, and proposals
    already recorded are not run again. The constructor raises :class:`~mergeplug.errors.MergeplugError` for a
    space it cannot search.
    """

    #: Whether the strategy needs ``search.trials`` (it would propose forever otherwise).
    needs_trials: ClassVar[bool] = False

    def __init__(self, space: Sequence[Dimension], seed: int, parameters: dict, trials: int | None = None):
        self.space = list(space)
        self.seed = int(seed)
        self.parameters = dict(parameters)
        self.trials = trials

    def size(self) -> int | None:
        """How many proposals at most (for the progress bar); None when unknown."""
        return self.trials

    def propose(self, trials: Sequence[Trial]) -> dict | None:
        raise NotImplementedError(f"{type(self).__name__} must implement propose()")


def parameters_key(parameters: dict) -> str:
    """The hash a trial is recorded under: its parameters as sorted JSON (floats by their exact repr)."""
    blob = json.dumps(parameters, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def describe(parameters: dict) -> str:
    """``lambda=0.4, models.0.weight=1`` for messages."""
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in parameters.items())


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# --- the space -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """Where a space key sets its value: a global parameter (``model`` None) or model ``model``'s own."""

    parameter: str
    model: int | None = None


def resolve_address(key: str, models: list[dict]) -> Address:
    """``lambda`` -> global; ``models.<i>.<p>`` or ``models.<name>.<p>``, name being a model's ``model``
    reference, its folder name or its ``domain``; an unmatched or ambiguous name is an error."""
    if not key.startswith("models."):
        return Address(key)
    selector, dot, parameter = key[len("models."):].rpartition(".")
    if not dot or not selector or not parameter:
        raise MergeplugError(f"{key}: write models.<index or model name>.<parameter> (e.g. models.0.weight)")
    if selector.isdigit():
        index = int(selector)
        if index >= len(models):
            raise MergeplugError(f"{key}: the merge recipe has {len(models)} model(s) (models.0 to "
                                 f"models.{len(models) - 1})")
        return Address(parameter, index)
    matches = [i for i, m in enumerate(models)
               if selector in (m.get("model"), Path(str(m.get("model", "")).rstrip("/")).name, m.get("domain"))]
    if len(matches) != 1:
        names = ", ".join(f"{i}: {m.get('model')}" for i, m in enumerate(models))
        what = "matches no model" if not matches else f"matches models {matches}"
        raise MergeplugError(f"{key}: {selector!r} {what}; name a model by index, reference, folder name or "
                             f"domain ({names})")
    return Address(parameter, matches[0])


def space_problems(space: dict, merge_data: dict, merger, *, source: str) -> tuple[list[Dimension], list[str]]:
    """The space's dimensions and one line per problem: unknown parameters, bad addresses, invalid values.

    ``merge_data`` is the merge recipe as written (before defaults), so that a model's own value is one it sets.
    """
    from .recipe import parameter_problems
    from .schema import problems
    from .schedule import is_schedule

    global_schema, model_schema = merger.parameters, merger.model_parameters
    model_props = (model_schema or {}).get("properties", {})
    global_props = global_schema.get("properties", {})
    out: list[str] = []
    dims: list[Dimension] = []
    if not space:
        return [], [f"{source}: search.space is empty: name at least one parameter of merger {merger.name!r} "
                    f"to search (e.g. {next(iter(global_props or model_props or {'lambda': 0}))}: [0.2, 0.4, 0.6])"]
    for key, spec in space.items():
        where = ["search", "space", key]
        try:
            address = resolve_address(key, merge_data["models"])
        except MergeplugError as exc:
            out.append(f"{source}: search.space.{exc}")
            continue
        if address.model is None:
            props = {**model_props, **global_props}
            schema = {**global_schema, "properties": props}
            kind = "parameter"
        else:
            props, schema, kind = model_props, model_schema or {}, "per-model parameter"
        prop = props.get(address.parameter)
        if prop is None:
            known = ", ".join(sorted(props)) or "none"
            out.append(f"{source}: {format_path(where)}: merger {merger.name!r} has no {kind} "
                       f"{address.parameter!r}; its {kind}s: {known}")
            continue
        if address.model is None and address.parameter in model_props and address.parameter not in global_props:
            own = [i for i, m in enumerate(merge_data["models"]) if address.parameter in (m.get("parameters") or {})]
            if own:
                out.append(f"{source}: {format_path(where)}: models[{own[0]}] sets its own {address.parameter}, "
                           f"which would override the searched one; search models.{own[0]}.{address.parameter} "
                           f"instead")
                continue
        integer = prop.get("type") == "integer"
        # Each value alone against its property (cross-parameter rules are the trial's full check's job).
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        value_schema = {**defs, **prop}
        if isinstance(spec, list):
            if not spec:
                out.append(f"{source}: {format_path(where)}: no values to try; give a list such as [0.2, 0.4]")
                continue
            for i, value in enumerate(spec):
                if is_schedule(value, prop):
                    one = {**defs, "type": "object", "properties": {address.parameter: prop}}
                    out += parameter_problems({address.parameter: value}, one, source=source, where=[*where, i])
                else:
                    out += problems(value, value_schema, source=source, prefix=[*where, i])
            dims.append(Dimension(key, values=tuple(spec), integer=integer))
            continue
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        before = len(out)
        for end in ("low", "high"):
            out += problems(spec[end], value_schema, source=source, prefix=[*where, end])
        if len(out) > before:
            continue
        if low > high:
            out.append(f"{source}: {format_path(where)}: low {low} is greater than high {high}")
        elif log and low <= 0:
            out.append(f"{source}: {format_path(where)}: log: true samples log-uniformly and needs low > 0, got {low}")
        else:
            dims.append(Dimension(key, low=low, high=high, log=log, integer=integer))
    return dims, out


def apply_parameters(merge_data: dict, parameters: dict) -> dict:
    """A copy of the merge recipe mapping with each searched value set where its key addresses it."""
    data = copy.deepcopy(merge_data)
    for key, value in parameters.items():
        address = resolve_address(key, data["models"])
        if address.model is None:
            target = data.setdefault("parameters", {})
        else:
            target = data["models"][address.model].setdefault("parameters", {})
        target[address.parameter] = copy.deepcopy(value)
    return data


# --- reading and checking tune recipes -------------------------------------------------------------------------
def load_tune_recipe(path: str | Path, *, registry=None):
    """Read and check a tune recipe file; a relative ``merge:`` path is read beside the tune recipe."""
    from .recipe import check_recipe, read_recipe_file

    path = Path(path)
    data = read_recipe_file(path)
    merge = data.get("merge")
    if isinstance(merge, str) and not Path(merge).expanduser().is_absolute() and (path.parent / merge).is_file():
        data["merge"] = str((path.parent / merge).resolve())
    elif isinstance(merge, dict):
        data["merge"] = _absolute_refs(merge, path.parent)
    return check_recipe(data, source=path.name, registry=registry, kind="tune", path=path)


def _absolute_refs(merge_data: dict, folder: Path | None) -> dict:
    """Model references that are local folders (relative to the working directory or to ``folder``) made
    absolute, so trial recipes and best_recipe.yaml (written elsewhere) find them; hub ids stay."""
    data = copy.deepcopy(merge_data)

    def absolute(ref):
        if not isinstance(ref, str) or Path(ref).expanduser().is_absolute():
            return ref
        for candidate in [Path.cwd() / ref] + ([folder / ref] if folder else []):
            if candidate.is_dir():
                return str(candidate.resolve())
        return ref

    if "base_model" in data:
        data["base_model"] = absolute(data["base_model"])
    for entry in data.get("models") or []:
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = absolute(entry["model"])
    return data


def merge_mapping(tune_data: dict, source: str) -> tuple[dict, Path | None]:
    """The tune recipe's merge recipe as a mergeplug mapping (another tool's dialect converted), and the
    folder its relative model paths are read from."""
    from .recipe import DIALECTS, read_recipe_file

    merge = tune_data["merge"]
    folder = None
    if isinstance(merge, str):
        path = Path(merge).expanduser()
        if not path.is_file():
            raise MergeplugError(f"{source}: merge: {merge}: no such merge recipe file")
        merge, folder = read_recipe_file(path), path.parent
    for detect, convert in DIALECTS:
        if detect(merge):
            merge = convert(copy.deepcopy(merge), source)
            break
    return _absolute_refs(merge, folder), folder


def check_merge_part(tune_data: dict, *, source: str, registry=None):
    """The checked merge recipe of a tune recipe (a :class:`~mergeplug.recipe.Recipe` of kind merge)."""
    from .recipe import check_recipe

    mapping, _ = merge_mapping(tune_data, source)
    where = tune_data["merge"] if isinstance(tune_data["merge"], str) else "merge"
    label = f"{source}: merge ({Path(where).name})" if isinstance(tune_data["merge"], str) else f"{source}: merge"
    return check_recipe(copy.deepcopy(mapping), source=label, registry=registry, kind="merge")


def tune_recipe_problems(recipe, registry) -> list[str]:
    """The component checks of a tune recipe: its merge recipe, strategy, space, domains and data."""
    from .recipe import parameter_problems
    from .schema import with_defaults

    data, source, out = recipe.data, recipe.source, []
    try:
        merge = check_merge_part(data, source=source, registry=registry)
    except MergeplugError as exc:
        return list(exc.problems)
    for where, component in merge.components.items():
        recipe.components[f"merge.{where}"] = component
    merger = merge.components["method"]

    search = data["search"]
    strategy_use = search["strategy"]
    name = strategy_use if isinstance(strategy_use, str) else strategy_use["name"]
    try:
        strategy = registry.get("strategy", name)
    except MergeplugError as exc:
        return [f"{source}: search.strategy: {exc}"]
    recipe.components["search.strategy"] = strategy
    given = {} if isinstance(strategy_use, str) else strategy_use.get("parameters", {})
    lines = parameter_problems(given, strategy.parameters, source=source, where=["search", "strategy", "parameters"])
    if lines:
        return lines
    search["strategy"] = {"name": name, "parameters": with_defaults(given, strategy.parameters)}

    mapping, _ = merge_mapping(data, source)  # as written: the checked copy has every default filled in
    dims, out = space_problems(search["space"], mapping, merger, source=source)
    if out:
        return out
    try:
        build_strategy(strategy, dims, search)
    except MergeplugError as exc:
        return [f"{source}: search: strategy {name}: {line}" for line in exc.problems]

    out += _domain_problems(recipe, merge, registry)
    return out


def build_strategy(component, dims: list[Dimension], search: dict) -> SearchStrategy:
    """The strategy plugin's object on this space; an error for a strategy that needs ``trials`` without it."""
    cls = component.load()
    if not (isinstance(cls, type) and issubclass(cls, SearchStrategy)):
        raise MergeplugError(f"{component.describe()} is not a mergeplug.tuning.SearchStrategy subclass")
    if cls.needs_trials and search.get("trials") is None:
        raise MergeplugError("it proposes points until stopped; give search.trials (e.g. trials: 20)")
    return cls(dims, search["seed"], search["strategy"]["parameters"], search.get("trials"))


def _domain_problems(recipe, merge, registry) -> list[str]:
    """Every model has a domain of its own, and each domain something to score on."""
    data, source, out = recipe.data, recipe.source, []
    measure = data["objective"]["measure"]
    seen: dict[str, int] = {}
    for i, entry in enumerate(merge.data["models"]):
        domain = entry.get("domain")
        if domain is None:
            out.append(f"{source}: merge: models[{i}] ({entry['model']}) has no domain: the objective divides the "
                       f"merged model's score on each domain by its specialist's; "
                       f"give it `domain:` (e.g. domain: math)")
            continue
        if domain in seen:
            out.append(f"{source}: merge: models[{seen[domain]}] and models[{i}] both have domain {domain}; the "
                       f"objective needs one specialist per domain")
            continue
        seen[domain] = i
        try:
            component = registry.get("domain", domain)
        except MergeplugError as exc:
            out.append(f"{source}: merge: models[{i}].domain: {exc}")
            continue
        recipe.components[f"merge.models[{i}].domain"] = component
        if measure == "likelihood" and component.load().validation is None and domain not in (data.get("data") or {}) \
                and not entry.get("data"):
            out.append(f"{source}: objective: domain {domain} (models[{i}]) has no validation set to score on; give "
                       f"held-out files with data: {{{domain}: {{data_files: val.jsonl}}}} (instruction, response)")
    if out:
        return out  # keys of data: are checked against the domains once those are right
    if measure == "likelihood":
        for key in data.get("data") or {}:
            if key not in seen:
                out.append(f"{source}: data.{key}: not one of the tuned domains ({', '.join(seen) or 'none'}); with "
                           f"measure likelihood, data: is keyed by domain")
    else:
        known, listed = set(), []
        for domain in seen:
            names = [bench["name"] for bench in registry.get("domain", domain).load().benchmarks]
            known |= {*names, *(f"{domain}.{name}" for name in names)}
            listed.append(f"{domain}: {', '.join(names)}")
        for key in data.get("data") or {}:
            if key not in known:
                out.append(f"{source}: data.{key}: no benchmark of the tuned domains is called that "
                           f"({'; '.join(listed)}); with measure benchmarks, data: is keyed by benchmark or "
                           f"domain.benchmark")
    return out


# --- objectives -----------------------------------------------------------------------------------------------
class Objective:
    """Scores a model folder on each domain; higher is better, and a specialist's score must be positive.

    ``domains`` are the tuned domains; :meth:`settings` is what makes two objectives give comparable scores
    (recorded in ``tune.json``; a resumed search with other settings is refused). Subclass it to tune on your
    own measure through the Python API (``tune(..., objective=...)``).
    """

    domains: list[str]

    def settings(self) -> dict:
        return {}

    def score(self, model: str, domains: Sequence[str], workdir: Path) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class BackendSettings:
    backend: str = "transformers"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    max_length: int | None = None
    trust_remote_code: bool = False

    def options(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "batch_size": self.batch_size,
                "max_length": self.max_length, "trust_remote_code": self.trust_remote_code, "chat_template": False}


class LikelihoodObjective(Objective):
    """exp(mean per-token log-likelihood of the responses) on each domain's validation rows (1/perplexity)."""

    def __init__(self, examples: dict[str, list[tuple[str, str]]], origins: dict[str, str], limit: int,
                 backend: BackendSettings):
        self.examples, self.origins, self.limit, self.backend = examples, origins, limit, backend
        self.domains = list(examples)

    @classmethod
    def from_recipe(cls, data: dict, merge_data: dict, backend: BackendSettings, *, limit: int,
                    registry=None) -> "LikelihoodObjective":
        from .data import load_rows, render_training_example, shuffled_first
        from .plugins import get_registry

        registry = registry or get_registry()
        examples, origins = {}, {}
        for i, model in enumerate(merge_data["models"]):
            name = model["domain"]
            domain = registry.get("domain", name).load()
            source = (data.get("data") or {}).get(name) or model.get("data")
            entry = domain.validation
            if entry is None:
                entry = {"name": f"{name} validation", "split": "train", "columns": dict(LOCAL_VALIDATION_COLUMNS)}
            # Every row first, then the seed-42 shuffle: the sample is spread over the whole set.
            loaded = load_rows(entry, source=source, offline=data.get("offline"), label=f"{name}/validation")
            rows = shuffled_first(loaded.rows, limit)
            if not rows:
                raise MergeplugError(f"domain {name}: its validation data ({loaded.origin}) has no rows")
            examples[name] = [render_training_example(domain, row) for row in rows]
            origins[name] = loaded.origin
        return cls(examples, origins, limit, backend)

    def settings(self) -> dict:
        texts = {d: hashlib.sha1(json.dumps(ex).encode()).hexdigest()[:16] for d, ex in self.examples.items()}
        return {"measure": "likelihood", "limit": self.limit, "backend": asdict(self.backend),
                "data": {d: {"origin": self.origins[d], "rows": len(self.examples[d]), "texts": texts[d]}
                         for d in self.domains}}

    def score(self, model: str, domains: Sequence[str], workdir: Path) -> dict[str, float]:
        from .evaluation import Loglikelihood
        from .runner import open_backend

        requests, owner = [], []
        for domain in domains:
            for prompt, response in self.examples[domain]:
                requests.append(Loglikelihood(prompt, response))
                owner.append(domain)
        with _quiet_loading(), open_backend(self.backend.backend, model, progress=False,
                                            **self.backend.options()) as backend:
            results = backend.loglikelihood(requests)
        totals = {d: [0.0, 0] for d in domains}
        for domain, result in zip(owner, results):
            totals[domain][0] += result.logprob
            totals[domain][1] += result.tokens
        scores = {}
        for domain, (logprob, tokens) in totals.items():
            if tokens == 0:
                raise MergeplugError(f"domain {domain}: every validation response is empty; nothing to score")
            scores[domain] = math.exp(logprob / tokens)
        return scores


class BenchmarkObjective(Objective):
    """The domain score of ``mergeplug evaluate`` (weighted mean headline metric of the domain's benchmarks)."""

    def __init__(self, domains: list[str], limit: int, backend: BackendSettings, data: dict, offline: bool | None,
                 max_new_tokens: int | None):
        self.domains, self.limit, self.backend, self.data = domains, limit, backend, data
        self.offline, self.max_new_tokens = offline, max_new_tokens

    def settings(self) -> dict:
        return {"measure": "benchmarks", "limit": self.limit, "backend": asdict(self.backend), "data": self.data,
                "offline": self.offline, "max_new_tokens": self.max_new_tokens}

    def test_splits(self, registry=None) -> list[str]:
        """The benchmarks scored on their own (test) data: no held-out files were given for them."""
        from .plugins import get_registry

        registry = registry or get_registry()
        out = []
        for domain in self.domains:
            for bench in registry.get("domain", domain).load().benchmarks:
                if bench["name"] not in self.data and f"{domain}.{bench['name']}" not in self.data:
                    out.append(f"{domain}/{bench['name']}")
        return out

    def score(self, model: str, domains: Sequence[str], workdir: Path) -> dict[str, float]:
        from .evaluate_models import EvaluateOptions, evaluate_models

        options = EvaluateOptions(backend=self.backend.backend, backend_options=self.backend.options(),
                                  limit=self.limit, data=self.data, offline=self.offline, progress=False,
                                  max_new_tokens=self.max_new_tokens)
        with _quiet_loading():
            summary = evaluate_models([model], list(domains), workdir, options)
        scores = summary["models"][model]["domain_scores"]
        return {d: float(scores[d]) for d in domains}


@contextmanager
def _quiet_loading():
    """No transformers "Loading weights" bar per trial: the search's own bar is the one to watch."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a backend without transformers
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def objective_from_recipe(data: dict, merge_data: dict, *, device: str, limit: int | None, registry=None) -> Objective:
    conf = data["objective"]
    backend = BackendSettings(conf["backend"], device, conf["dtype"], conf["batch_size"], conf.get("max_length"),
                              bool(merge_data.get("trust_remote_code", False)))
    limit = limit or conf["limit"]
    if conf["measure"] == "likelihood":
        return LikelihoodObjective.from_recipe(data, merge_data, backend, limit=limit, registry=registry)
    domains = [m["domain"] for m in merge_data["models"]]
    return BenchmarkObjective(domains, limit, backend, dict(data.get("data") or {}), data.get("offline"),
                              conf.get("max_new_tokens"))


# --- the search loop ---------------------------------------------------------------------------------------------
class TrialStore:
    """``trials.jsonl``: recorded trials by parameters key; each new trial is appended and flushed at once."""

    def __init__(self, path: Path | None):
        self.path = path
        self.recorded: dict[str, Trial] = {}
        if path is not None and path.is_file():
            with path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        trial = Trial(**record)
                    except (json.JSONDecodeError, TypeError):
                        continue  # a torn last line of an interrupted run: that trial runs again
                    self.recorded[trial.key] = trial

    def add(self, trial: Trial) -> None:
        self.recorded[trial.key] = trial
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(_clean(trial.record())) + "\n")
                f.flush()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_search(strategy: SearchStrategy, evaluate: Callable[[int, dict], Trial], *, store: TrialStore | None = None,
               max_trials: int | None = None, progress: bool | None = False, retry_failed: bool = False,
               on_trial: Callable[[Trial, bool], None] | None = None) -> list[Trial]:
    """Ask ``strategy`` for points until it is done (or ``max_trials`` points were seen) and evaluate each.

    ``evaluate(number, parameters)`` returns a :class:`Trial`; an exception it raises is recorded as a failed
    trial and the search goes on (Ctrl-C stops it; finished trials stay recorded). A point already in
    ``store`` is not evaluated again (failed ones are, with ``retry_failed``). ``on_trial(trial, new)`` is
    called after each point. Returns the trials in the order proposed.
    """
    from tqdm.auto import tqdm

    store = store or TrialStore(None)
    size = strategy.size()
    total = min(size, max_trials) if size is not None and max_trials is not None else (size or max_trials)
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    history: list[Trial] = []
    best: Trial | None = None
    with tqdm(total=total, desc="tune", unit="trial", disable=disable) as bar:
        while max_trials is None or len(history) < max_trials:
            parameters = strategy.propose(list(history))
            if parameters is None:
                break
            key = parameters_key(parameters)
            trial = store.recorded.get(key)
            new = trial is None or (retry_failed and trial.status == "failed" and key not in {t.key for t in history})
            if new:
                number = 1 + max((t.number for t in store.recorded.values()), default=0)
                try:
                    trial = evaluate(number, parameters)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad trial must not end the search
                    message = ("; ".join(exc.problems) if isinstance(exc, MergeplugError)
                               else f"{type(exc).__name__}: {exc}")
                    trial = Trial(number, parameters, key, status="failed", error=message)
                    if not disable:
                        bar.write(f"trial {number} ({describe(parameters)}) failed: {message}")
                store.add(trial)
            history.append(trial)
            if trial.status == "ok" and (best is None or trial.objective > best.objective):
                best = trial
            if on_trial is not None:
                on_trial(trial, new)
            bar.update(1)
            if best is not None:
                bar.set_postfix(best=f"{best.objective:.4f}", at=describe(best.parameters), refresh=False)
    return history


def best_trial(trials: Sequence[Trial]) -> Trial | None:
    """The successful trial with the highest objective; the first one proposed on a tie."""
    ok = [t for t in trials if t.status == "ok" and t.objective is not None]
    return max(ok, key=lambda t: t.objective) if ok else None


# --- the tune command's core -------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    out: Path
    trials: list[Trial]
    best: Trial | None
    table: str
    specialists: dict[str, dict]
    ran: int  # trials merged and scored in this run (the others were recorded before)


def tune(recipe, out: str | Path, *, force: bool = False, device: str | None = None, limit: int | None = None,
         keep: bool = False, progress: bool | None = None, retry_failed: bool = False,
         objective: Objective | None = None, registry=None) -> TuneResult:
    """Run a tune recipe (a path, or a checked :class:`~mergeplug.recipe.Recipe` of kind tune) into ``out``."""
    from . import engine
    from .checkpoint import replace_folder
    from .plugins import get_registry
    from .recipe import Recipe, check_recipe

    registry = registry or get_registry()
    if not isinstance(recipe, Recipe):
        recipe = load_tune_recipe(recipe, registry=registry)
    elif recipe.kind != "tune":
        raise MergeplugError(f"{recipe.source}: kind: this is a {recipe.kind} recipe, but a tune recipe was expected")
    data, source = recipe.data, recipe.source
    out = Path(out)
    merge_data, _ = merge_mapping(data, source)
    checked = check_merge_part(data, source=source, registry=registry)
    device = engine.resolve_device(device or data.get("device", "auto"))
    search = data["search"]
    dims, problems = space_problems(search["space"], merge_data, checked.components["method"], source=source)
    if problems:
        raise MergeplugError(*problems)
    strategy = build_strategy(registry.get("strategy", search["strategy"]["name"]), dims, search)

    if objective is None:
        objective = objective_from_recipe(data, checked.data, device=device, limit=limit, registry=registry)
        if isinstance(objective, BenchmarkObjective):
            tests = objective.test_splits(registry)
            if tests:
                print(f"mergeplug: warning: measure benchmarks tunes on test splits ({', '.join(tests)}): the best "
                      f"score overstates held-out performance; give held-out files with data:", file=sys.stderr)
    settings = {"merge": checked.data, "inputs": _input_fingerprints(checked.data), "objective": objective.settings()}
    _prepare_output(out, settings, force, source)
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted trial left
    work.mkdir(parents=True)
    summary = {"status": "running", "settings": settings}
    _write_json(out / SUMMARY_FILE, summary)

    started = time.perf_counter()
    specialists = _specialist_scores(out, objective, checked.data, work, progress)
    specialist_seconds = time.perf_counter() - started
    domains = objective.domains
    kept: dict[str, Any] = {"folder": None, "trial": None, "objective": None}

    def evaluate(number: int, parameters: dict) -> Trial:
        key = parameters_key(parameters)
        trial_source = f"trial {number} ({describe(parameters)})"
        t0 = time.perf_counter()
        trial_recipe = check_recipe(apply_parameters(merge_data, parameters), source=trial_source,
                                    registry=registry, kind="merge")
        folder = work / f"trial-{number}-{key}"
        try:
            plan = engine.plan_merge(trial_recipe, device=device, registry=registry)
            engine.run_merge(plan, folder, force=True, progress=False)
            t1 = time.perf_counter()
            scores = objective.score(str(folder), domains, work / f"eval-{number}-{key}")
            t2 = time.perf_counter()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work / f"eval-{number}-{key}", ignore_errors=True)
        normalised = {d: scores[d] / specialists[d]["score"] for d in domains}
        value = math.fsum(normalised.values()) / len(normalised)
        if not math.isfinite(value):
            shutil.rmtree(folder, ignore_errors=True)
            raise MergeplugError(f"{trial_source}: the objective is {value} (scores {scores})")
        trial = Trial(number, parameters, key, "ok", value, scores, normalised, round(t1 - t0, 3), round(t2 - t1, 3))
        if keep and (kept["objective"] is None or value > kept["objective"]):
            if kept["folder"] is not None:
                shutil.rmtree(kept["folder"], ignore_errors=True)
            kept.update(folder=folder, trial=number, objective=value)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return trial

    store = TrialStore(out / TRIALS_FILE)
    before = len(store.recorded)
    ran = []
    history = run_search(strategy, evaluate, store=store, max_trials=search.get("trials"), progress=progress,
                         retry_failed=retry_failed, on_trial=lambda t, new: ran.append(t) if new else None)
    # Every recorded trial counts, also those of earlier runs outside this run's space.
    everything = _unique([*history, *sorted(store.recorded.values(), key=lambda t: t.number)])
    best = best_trial(everything)
    table = format_table(everything, domains, best)
    (out / TABLE_FILE).write_text(table + "\n", encoding="utf-8")
    if best is not None:
        best_data = apply_parameters(merge_data, best.parameters)
        _write_best_recipe(out / BEST_RECIPE_FILE, best_data, best, len(everything), domains)
        if keep:
            target = out / BEST_MODEL_DIR
            if kept["trial"] == best.number:
                replace_folder(kept["folder"], target)
            else:  # the best trial was recorded by an earlier run: merge it once more
                best_recipe = check_recipe(best_data, source=f"trial {best.number}", registry=registry, kind="merge")
                engine.run_merge(engine.plan_merge(best_recipe, device=device, registry=registry), target,
                                 force=True, progress=False)
    shutil.rmtree(work, ignore_errors=True)
    ok = [t for t in everything if t.status == "ok"]
    summary = {
        "status": "done", "settings": settings,
        "strategy": search["strategy"], "seed": search["seed"], "space": search["space"],
        "objective": {"definition": "mean over domains d of score(merged, d) / score(specialist_d, d) "
                                    "(MergeBench's normalised performance, arXiv:2505.10833)",
                      "domains": domains},
        "trials": {"recorded": len(everything), "ok": len(ok), "failed": len(everything) - len(ok),
                   "ran_now": len(ran), "recorded_before": before},
        "best": _clean(best.record()) if best else None,
        "best_recipe": str(out / BEST_RECIPE_FILE) if best else None,
        "best_model": str(out / BEST_MODEL_DIR) if best and keep else None,
        "specialists": specialists,
        "seconds": {"merge": round(sum(t.merge_seconds for t in everything), 3),
                    "evaluation": round(sum(t.evaluation_seconds for t in everything), 3),
                    "specialists_this_run": round(specialist_seconds, 3)},
    }
    _write_json(out / SUMMARY_FILE, summary)
    return TuneResult(out, everything, best, table, specialists, len(ran))


def _unique(trials: list[Trial]) -> list[Trial]:
    seen, out = set(), []
    for trial in trials:
        if trial.key not in seen:
            seen.add(trial.key)
            out.append(trial)
    return out


def _input_fingerprints(merge_data: dict) -> dict:
    from .statistics import model_fingerprint

    refs = ([("base_model", merge_data["base_model"])] if "base_model" in merge_data else []) + \
        [(f"models[{i}]", m["model"]) for i, m in enumerate(merge_data["models"])]
    return {label: hashlib.sha1(json.dumps(model_fingerprint(ref), sort_keys=True).encode()).hexdigest()[:16]
            for label, ref in refs}


def _changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (``objective.limit``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _changes(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [path or "(all)"]


def _prepare_output(out: Path, settings: dict, force: bool, source: str) -> None:
    """Resume into ``out`` when its recorded settings match; refuse otherwise unless ``force`` (start over)."""
    summary_path = out / SUMMARY_FILE
    if out.exists() and not out.is_dir():
        raise MergeplugError(f"{out}: exists and is not a folder; choose another output")
    if summary_path.is_file():
        try:
            recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("settings")
        except (OSError, json.JSONDecodeError):
            recorded = None
        now = json.loads(json.dumps(settings, default=str))  # as it reads back from tune.json
        changed = _changes(recorded, now) if recorded is not None else ["(unreadable)"]
        if changed and not force:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise MergeplugError(f"{out}: holds trials of another search (changed since: {shown}); pass --force to "
                                 f"discard them and start over, or choose another output folder")
        if changed:
            _discard(out)
    elif out.is_dir() and any(p.name != WORK_DIR for p in out.iterdir()):
        if not force:
            raise MergeplugError(f"{out}: exists and holds no tune search; pass --force to use it anyway, or choose "
                                 f"another output folder")
        _discard(out)  # trials.jsonl without its settings cannot be trusted
    out.mkdir(parents=True, exist_ok=True)


def _discard(out: Path) -> None:
    """Remove what an earlier search wrote into ``out`` (only our own files)."""
    for name in (TRIALS_FILE, SPECIALISTS_FILE, TABLE_FILE, BEST_RECIPE_FILE, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / BEST_MODEL_DIR, ignore_errors=True)
    shutil.rmtree(out / "specialists", ignore_errors=True)


def _specialist_scores(out: Path, objective: Objective, merge_data: dict, work: Path,
                       progress: bool | None) -> dict[str, dict]:
    """Each domain's specialist's score, from ``specialists.json`` when its objective settings match."""
    path = out / SPECIALISTS_FILE
    cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = hashlib.sha1(json.dumps(objective.settings(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    result = {}
    for model in merge_data["models"]:
        domain, ref = model["domain"], model["model"]
        entry = cached.get(domain)
        if not entry or entry.get("model") != ref or entry.get("key") != key:
            if progress or (progress is None and sys.stderr.isatty()):
                print(f"scoring specialist of {domain}: {ref}", file=sys.stderr)
            t0 = time.perf_counter()
            score = objective.score(ref, [domain], out / "specialists")[domain]
            entry = {"model": ref, "key": key, "score": score, "seconds": round(time.perf_counter() - t0, 3)}
            cached[domain] = entry
            _write_json(path, cached)
        if not (isinstance(entry["score"], (int, float)) and entry["score"] > 0 and math.isfinite(entry["score"])):
            raise MergeplugError(f"specialist of domain {domain} ({ref}) scores {entry['score']}: normalised "
                                 f"performance divides by it; score more samples (objective.limit) or use "
                                 f"measure: likelihood")
        result[domain] = entry
    return result


def _write_json(path: Path, data: Any) -> None:
    write_json(path, _clean(data), ensure_ascii=True)


def _write_best_recipe(path: Path, data: dict, best: Trial, count: int, domains: list[str]) -> None:
    import yaml

    header = (f"# The best of {count} trials of `mergeplug tune`: trial {best.number}, objective "
              f"{best.objective:.6g}\n# (mean normalised score over {', '.join(domains)}). "
              f"Run it with: mergeplug merge {path.name} -o OUT\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def format_table(trials: Sequence[Trial], domains: Sequence[str], best: Trial | None = None) -> str:
    """A Markdown table of the trials, the best objective first, failed trials last; the best row is marked."""
    names: list[str] = []
    for trial in trials:
        names += [k for k in trial.parameters if k not in names]
    head = ["trial", *names, "objective", *domains, "merge s", "eval s", "status"]
    ordered = sorted(trials, key=lambda t: (t.status != "ok", -(t.objective or 0.0), t.number))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for t in ordered:
        mark = best is not None and t.key == best.key
        cells = [f"**{t.number}** (best)" if mark else str(t.number)]
        cells += [_fmt_value(t.parameters[n]) if n in t.parameters else "–" for n in names]
        cells.append(f"{t.objective:.4f}" if t.objective is not None else "–")
        cells += [f"{t.normalised[d]:.4f}" if d in t.normalised else "–" for d in domains]
        cells += [f"{t.merge_seconds:.1f}", f"{t.evaluation_seconds:.1f}"]
        error = (t.error or "").replace("|", "/").replace("\n", " ")
        cells.append("ok" if t.status == "ok" else f"failed: {error[:100]}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
