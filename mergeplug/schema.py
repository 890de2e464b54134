"""JSON Schema validation with one readable line per problem, and explicit defaults.

jsonschema neither fills in ``default`` values nor names the path of a problem in a way people read, so this
module does both: ``problems()`` returns lines like
``recipe.yaml: models[1].parameters.density: 1.7 is greater than the maximum of 1`` and ``with_defaults()``
fills defaults after validation.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Sequence

from .errors import closest_first

SCHEMA_URN = "urn:mergeplug:schema:"
Path_ = Sequence["str | int"]


@lru_cache(maxsize=None)
def _all_schemas() -> dict[str, dict]:
    schemas = {}
    for entry in resources.files("mergeplug.schemas").iterdir():
        if entry.name.endswith(".schema.json"):
            schema = json.loads(entry.read_text(encoding="utf-8"))
            schemas[schema["$id"]] = schema
    return schemas


def load_schema(name: str) -> dict:
    """A schema shipped in ``schemas/`` by its short name (``merge``, ``common``, ``component-parameters``)."""
    return _all_schemas()[SCHEMA_URN + name]


@lru_cache(maxsize=None)
def _ref_registry():
    from referencing import Registry, Resource

    return Registry().with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in _all_schemas().items()
    )


def _validator(schema: dict):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, registry=_ref_registry(), format_checker=cls.FORMAT_CHECKER)


def check_schema(schema: dict) -> list[str]:
    """Problems with a schema itself (is it valid draft 2020-12?)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [f"{format_path(exc.absolute_path)}: {exc.message}"]
    return []


def format_path(path: Iterable[str | int]) -> str:
    """``['models', 1, 'parameters', 'density']`` -> ``models[1].parameters.density``; ``()`` -> ``(root)``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _message(error) -> str:
    # jsonschema's own wording is fine for values; these three are the ones people hit with typos.
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        parts = []
        for key in extra:
            near = closest_first(key, allowed)[:1] if allowed else []
            hint = f" (did you mean {near[0]!r}?)" if near and _similar(key, near[0]) else ""
            parts.append(f"unknown field {key!r}{hint}")
        known = f"; allowed: {', '.join(sorted(allowed))}" if allowed else ""
        return "; ".join(parts) + known
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    if error.validator in ("oneOf", "anyOf") and error.context:
        # Report the closest alternative rather than "is not valid under any of the given schemas".
        best = min(error.context, key=lambda e: (len(e.relative_path), e.validator in ("type", "const")))
        return _message(best)
    return error.message


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.6


def problems(instance: Any, schema: dict, *, source: str, prefix: Path_ = ()) -> list[str]:
    """One line per way ``instance`` breaks ``schema``, each naming ``source`` and the JSON path."""
    lines = []
    for error in sorted(_validator(schema).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        path = [*prefix, *error.absolute_path]
        lines.append(f"{source}: {format_path(path)}: {_message(error)}")
    return lines


def with_defaults(instance: dict, schema: dict) -> dict:
    """A copy of ``instance`` with every missing property that has a ``default`` in ``schema`` filled in.

    Recurses into nested object properties that are present (or defaulted to an object).
    """
    out = copy.deepcopy(instance)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if isinstance(out.get(key), dict) and sub.get("type") == "object" and "properties" in sub:
            out[key] = with_defaults(out[key], sub)
    return out


def defaults(schema: dict) -> dict:
    """The defaults a schema declares for its top-level properties."""
    return {k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v}


#: A float as YAML 1.2 writes it. PyYAML follows YAML 1.1, whose floats need a dot, so ``lr: 2e-5`` or
#: ``max_tokens: 1e8`` were read as the strings "2e-5" and "1e8" and refused as "not a number".
_YAML12_FLOAT = (r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
                 r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


@lru_cache(maxsize=None)
def _yaml_loader():
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that also reads YAML 1.2 floats without a dot (1e8, 2E-5) as numbers."""

    # Integers keep their own resolver, which is tried first: "12" stays an int.
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML12_FLOAT), list("-+0123456789."))
    return Loader


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that reads ``1e8`` and ``2e-5`` as floats (YAML 1.2), as people write them in recipes."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
