"""Recipes: YAML or JSON files that say what to merge, finetune, evaluate, fuse, bench or tune.

Checking happens in two passes, both before any model is opened: the recipe against its schema in
``schemas/``, then each component it names against the registry and against that component's own
parameter schema. Every problem is collected and reported as one line naming the file and the JSON path.
Defaults are filled in explicitly afterwards (jsonschema never does).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import MergeplugError
from .plugins import Component, Registry, get_registry
from .schedule import is_schedule
from .schema import format_path, load_schema, parse_yaml, problems, with_defaults

RECIPE_KINDS = ("merge", "finetune", "evaluate", "fuse", "bench", "tune")

#: Converters from other tools' recipe formats, tried in order: ``(detect(data) -> bool, convert(data, source))``.
DIALECTS: list[tuple[Callable[[dict], bool], Callable[[dict, str], dict]]] = []


@dataclass
class Recipe:
    """A checked recipe: ``data`` has every default filled in; ``components`` maps JSON paths to components."""

    kind: str
    data: dict
    source: str
    path: Path | None = None
    components: dict[str, Component] = field(default_factory=dict)

    def component(self, where: str) -> Component:
        return self.components[where]


# --- reading -----------------------------------------------------------------------------------------------
def read_recipe_file(path: str | Path) -> dict:
    """Parse a YAML or JSON recipe; a clear one-line error for a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeplugError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeplugError(f"{path}: cannot read the recipe: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MergeplugError(f"{path.name}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    else:
        import yaml

        try:
            data = parse_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise MergeplugError(f"{path.name}: {where}invalid YAML: {what}") from None
    if not isinstance(data, dict):
        raise MergeplugError(f"{path.name}: a recipe is a mapping of fields (method, models, ...), got {type(data).__name__}")
    return data


def load_recipe(path: str | Path, *, registry: Registry | None = None, kind: str | None = None) -> Recipe:
    """Read and check a recipe file; raises :class:`MergeplugError` listing every problem."""
    path = Path(path)
    return check_recipe(read_recipe_file(path), source=path.name, registry=registry, kind=kind, path=path)


# --- checking ----------------------------------------------------------------------------------------------
def recipe_kind(data: dict, source: str) -> str:
    kind = data.get("kind", "merge")
    if kind not in RECIPE_KINDS:
        raise MergeplugError(f"{source}: kind: {kind!r} is not one of {', '.join(RECIPE_KINDS)}")
    return kind


def check_recipe(data: dict, *, source: str, registry: Registry | None = None, kind: str | None = None,
                 path: str | Path | None = None) -> Recipe:
    """Check recipe ``data`` (a parsed file, or a dict built in Python) and fill its defaults; raises
    :class:`MergeplugError` listing every problem. ``source`` names it in messages; ``path``, where the recipe
    stands for a file, is what relative model and data paths are resolved against (else the working folder)."""
    registry = registry or get_registry()
    for detect, convert in DIALECTS:
        if detect(data):
            data = convert(copy.deepcopy(data), source)
            break
    found = recipe_kind(data, source)
    if kind and found != kind:
        raise MergeplugError(f"{source}: kind: this is a {found} recipe, but a {kind} recipe was expected")
    schema = load_schema(found)
    lines = problems(data, schema, source=source)
    if lines:
        raise MergeplugError(*lines)
    recipe = Recipe(found, with_defaults(data, schema), source, Path(path) if path is not None else None)
    lines = _COMPONENT_CHECKS[found](recipe, registry)
    if lines:
        raise MergeplugError(*lines)
    return recipe


def _resolve(recipe: Recipe, registry: Registry, kind: str, name: str, where: Sequence[str | int], out: list[str]):
    try:
        component = registry.get(kind, name)
    except MergeplugError as exc:
        out.append(f"{recipe.source}: {format_path(where)}: {exc}")
        return None
    recipe.components[format_path(where)] = component
    return component


def parameter_problems(values: dict, schema: dict, *, source: str, where: Sequence[str | int]) -> list[str]:
    """Check ``values`` against a component's parameter ``schema``; any numeric value may be a schedule.

    A schedule is a list of numbers (interpolated over layer depth) or a list of ``{filter, value}`` entries;
    each number in it is checked against the parameter's own schema.
    """
    if not isinstance(values, dict):
        return [f"{source}: {format_path(where)}: parameters must be a mapping, got {type(values).__name__}"]
    props = schema.get("properties", {})
    plain, scheduled, out = {}, set(), []
    for key, value in values.items():
        prop = props.get(key)
        if prop is None or not is_schedule(value, prop):
            plain[key] = value
            continue
        scheduled.add(key)
        if not value:
            out.append(f"{source}: {format_path([*where, key])}: a schedule needs at least one value")
        for i, entry in enumerate(value):
            at = [*where, key, i]
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - {"filter", "value"})
                if unknown:
                    out.append(f"{source}: {format_path(at)}: unknown field {unknown[0]!r} in a schedule entry; allowed: filter, value")
                if "value" not in entry:
                    out.append(f"{source}: {format_path(at)}: 'value' is required")
                if "filter" in entry and not isinstance(entry["filter"], str):
                    out.append(f"{source}: {format_path([*at, 'filter'])}: {entry['filter']!r} is not a string")
                inner = entry.get("value")
                items = [(j, v) for j, v in enumerate(inner)] if isinstance(inner, list) else [(None, inner)]
                for j, v in items:
                    if "value" in entry:
                        path = [*at, "value"] + ([j] if j is not None else [])
                        out += problems(v, _value_schema(schema, prop), source=source, prefix=path)
            else:
                out += problems(entry, _value_schema(schema, prop), source=source, prefix=at)
    rest = {**schema, "required": [r for r in schema.get("required", []) if r not in scheduled]}
    out += problems(plain, rest, source=source, prefix=where)
    return out


def _value_schema(schema: dict, prop: dict) -> dict:
    """The schema of one value of parameter ``prop`` (a schedule entry): the property's own, with the
    component schema's definitions it may refer to, and nothing of the object schema (type, required...)."""
    return {key: schema[key] for key in ("$defs", "definitions") if key in schema} | prop


def merger_needs_base(component: Component) -> bool:
    """Whether a merger takes task vectors against a base model: its registration's ``needs_base``, so no
    torch is imported to check a recipe; a plugin that registered without it is asked through its class."""
    needs = component.extra.get("needs_base")
    if needs is None:
        needs = getattr(component.load(), "needs_base", True)
    return bool(needs)


def _merge_checks(recipe: Recipe, registry: Registry) -> list[str]:
    data, out = recipe.data, []
    merger = _resolve(recipe, registry, "merger", data["method"], ["method"], out)
    if merger is None:
        return out
    global_schema, model_schema = merger.parameters, merger.model_parameters
    model_props = (model_schema or {}).get("properties", {})
    # A per-model parameter given at the top level is every model's default (as mergekit allows).
    both = {**global_schema, "properties": {**model_props, **global_schema.get("properties", {})}}
    given = data.get("parameters", {})
    out += parameter_problems(given, both, source=recipe.source, where=["parameters"])
    if merger_needs_base(merger) and "base_model" not in data:
        out.append(f"{recipe.source}: base_model: merger {merger.name!r} needs a base_model (it merges task vectors)")
    for i, entry in enumerate(data["models"]):
        own = entry.get("parameters", {})
        if own and model_schema is None:
            out.append(f"{recipe.source}: models[{i}].parameters: merger {merger.name!r} takes no per-model parameters")
            continue
        if model_schema is not None:
            inherited = {k: v for k, v in given.items() if k in model_props}
            out += parameter_problems({**inherited, **own}, model_schema, source=recipe.source, where=["models", i, "parameters"])
    if out:
        return out
    data["parameters"] = with_defaults({k: v for k, v in given.items() if k in global_schema.get("properties", {})}, global_schema)
    for entry in data["models"]:
        inherited = {k: v for k, v in given.items() if k in model_props}
        entry["parameters"] = with_defaults({**inherited, **entry.get("parameters", {})}, model_schema or {})
    return out


def _use(recipe: Recipe, registry: Registry, kind: str, where: list, out: list[str]) -> None:
    """Check a ``componentUse`` field (a name, or {name, parameters}) and fill the component's defaults."""
    value = recipe.data.get(where[0]) if len(where) == 1 else None
    if value is None:
        return
    name = value if isinstance(value, str) else value["name"]
    component = _resolve(recipe, registry, kind, name, where, out)
    if component is None:
        return
    params = {} if isinstance(value, str) else value.get("parameters", {})
    lines = parameter_problems(params, component.parameters, source=recipe.source, where=[*where, "parameters"])
    out += lines
    if not lines:
        recipe.data[where[0]] = {"name": name, "parameters": with_defaults(params, component.parameters)}


def _finetuner_use(recipe: Recipe, registry: Registry, out: list[str]) -> None:
    """Check the ``finetuner`` componentUse of a bench or fuse recipe: as in a finetune recipe, the core's
    training parameters (learning rate, epochs...) are valid for every finetuner; the plugin's own defaults are
    filled here, the training defaults when a run starts."""
    use = recipe.data["finetuner"]
    use = {"name": use, "parameters": {}} if isinstance(use, str) else {"parameters": {}, **use}
    finetuner = _resolve(recipe, registry, "finetuner", use["name"], ["finetuner"], out)
    if finetuner is None:
        return
    from .finetuning import parameter_schema

    lines = parameter_problems(use["parameters"], parameter_schema(finetuner), source=recipe.source,
                               where=["finetuner", "parameters"])
    out += lines
    if not lines:
        recipe.data["finetuner"] = {"name": use["name"],
                                    "parameters": with_defaults(use["parameters"], finetuner.parameters)}


def _domains(recipe: Recipe, registry: Registry, out: list[str]) -> None:
    value = recipe.data.get("domains")
    names = [value] if isinstance(value, str) else list(value or [])
    if names == ["all"]:
        # Resolved when used (mergeplug.data.resolve_domains): "all" means the capability domains, and telling
        # those from base-ability ones needs each domain's file.
        recipe.data["domains"] = ["all"]
        return
    for i, name in enumerate(names):
        where = ["domains"] if isinstance(value, str) else ["domains", i]
        _resolve(recipe, registry, "domain", name, where, out)
    recipe.data["domains"] = names


def _finetune_checks(recipe: Recipe, registry: Registry) -> list[str]:
    out: list[str] = []
    _domains(recipe, registry, out)
    trained = recipe.data["domains"]
    for key in recipe.data.get("data") or {}:
        # DOMAIN or DOMAIN.N; whether the domain has an N-th training set is checked when its file is read.
        name = key.partition(".")[0]
        if trained != ["all"] and name not in trained:
            out.append(f"{recipe.source}: data.{key}: {name!r} is not one of the recipe's domains "
                       f"({', '.join(trained)})")
        elif trained == ["all"] and name not in registry.names("domain"):
            _resolve(recipe, registry, "domain", name, ["data", key], out)
    finetuner = _resolve(recipe, registry, "finetuner", recipe.data["finetuner"], ["finetuner"], out)
    if finetuner is not None:
        from .finetuning import parameter_schema

        # Every finetuner takes the core's training parameters; the plugin's own defaults are filled here, the
        # training defaults when the run starts (mergeplug.finetuning.finetune).
        params = recipe.data.get("parameters", {})
        lines = parameter_problems(params, parameter_schema(finetuner), source=recipe.source, where=["parameters"])
        out += lines
        if not lines:
            recipe.data["parameters"] = with_defaults(params, finetuner.parameters)
    return out


def _evaluate_checks(recipe: Recipe, registry: Registry) -> list[str]:
    out: list[str] = []
    _domains(recipe, registry, out)
    return out


def _fuse_checks(recipe: Recipe, registry: Registry) -> list[str]:
    """The aligner and merger with their parameters; the finetuner with the core's training parameters too (as
    in a finetune recipe; the training defaults are filled when the run starts); the merger must merge task
    vectors against a base (the pivot is the base of every target model)."""
    out: list[str] = []
    _use(recipe, registry, "aligner", ["aligner"], out)
    _use(recipe, registry, "merger", ["merger"], out)
    merger = recipe.components.get("merger")
    if merger is not None and not merger_needs_base(merger):
        out.append(f"{recipe.source}: merger: {merger.name!r} does not merge against a base model; fuse merges the "
                   "target models as updates of the pivot: use varm, sce or another task-vector merger")
    _finetuner_use(recipe, registry, out)
    return out


def _bench_checks(recipe: Recipe, registry: Registry) -> list[str]:
    out: list[str] = []
    _domains(recipe, registry, out)
    for i, name in enumerate(recipe.data["base_abilities"]):
        _resolve(recipe, registry, "domain", name, ["base_abilities", i], out)
    _finetuner_use(recipe, registry, out)
    _use(recipe, registry, "executor", ["executor"], out)
    _resolve(recipe, registry, "backend", recipe.data["evaluation"]["backend"], ["evaluation", "backend"], out)
    labels = [base_label(entry, i) for i, entry in enumerate(recipe.data["base_models"])]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            out.append(f"{recipe.source}: base_models[{i}]: label {label!r} is already used by base_models"
                       f"[{labels.index(label)}]; give each a distinct name")
    for i, entry in enumerate(recipe.data["mergers"]):
        entry = {"name": entry} if isinstance(entry, str) else entry
        recipe.data["mergers"][i] = entry
        merger = _resolve(recipe, registry, "merger", entry["name"], ["mergers", i], out)
        if merger is None:
            continue
        props = {**(merger.model_parameters or {}).get("properties", {}), **merger.parameters.get("properties", {})}
        schema = {"type": "object", "properties": props, "additionalProperties": False}
        out += parameter_problems(entry.get("parameters", {}), schema, source=recipe.source, where=["mergers", i, "parameters"])
        for key, values in entry.get("grid", {}).items():
            if key not in props:
                out.append(f"{recipe.source}: {format_path(['mergers', i, 'grid', key])}: merger {merger.name!r} "
                           f"has no parameter {key!r}; its parameters: {', '.join(sorted(props)) or 'none'}")
                continue
            for j, value in enumerate(values):
                out += problems(value, props[key], source=recipe.source, prefix=["mergers", i, "grid", key, j])
    return out


def base_label(entry, index: int) -> str:
    """The label of a bench's base model: its ``name``, else the model folder's or hub id's last part, else
    ``tiny`` for a tiny base built by the bench (``tiny-N`` after the first)."""
    if isinstance(entry, str):
        return Path(entry.rstrip("/")).name or entry
    if entry.get("name"):
        return entry["name"]
    if "model" in entry:
        return Path(entry["model"].rstrip("/")).name or entry["model"]
    return "tiny" if index == 0 else f"tiny-{index}"


def _tune_checks(recipe: Recipe, registry: Registry) -> list[str]:
    # The space addresses the merger's own parameters, so its checks live beside the search (mergeplug.tuning).
    from .tuning import tune_recipe_problems

    return tune_recipe_problems(recipe, registry)


_COMPONENT_CHECKS: dict[str, Callable[[Recipe, Registry], list[str]]] = {
    "merge": _merge_checks,
    "finetune": _finetune_checks,
    "evaluate": _evaluate_checks,
    "fuse": _fuse_checks,
    "bench": _bench_checks,
    "tune": _tune_checks,
}


# --- dialects ----------------------------------------------------------------------------------------------
from .mergekit import convert_mergekit, is_mergekit  # noqa: E402 - registers into DIALECTS, defined above

DIALECTS.append((is_mergekit, convert_mergekit))
