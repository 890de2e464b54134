"""The mergekit recipe dialect: mergekit's YAML merge configurations are accepted as they are.

A recipe with a ``merge_method`` key is converted to a mergeplug merge recipe before it is checked:

==========================  ===========================================================================
mergekit                    mergeplug
==========================  ===========================================================================
``merge_method``            ``method`` (same names: linear, task_arithmetic, ties, dare_ties, ...)
``base_model``              ``base_model``; a ``models`` entry that is the base is dropped for methods
                            that take task vectors (mergekit takes none of the base against itself)
``models[{model, parameters}]``  ``models[{model, parameters}]``
``parameters``              ``parameters`` (same names; ``int8_mask``, a memory option, is ignored;
                            DELLA's ``epsilon`` is doubled: mergekit's is half the paper's window)
``out_dtype`` or ``dtype``  ``dtype`` (output); mergekit's ``dtype`` is also its arithmetic dtype, ours
                            stays ``compute_dtype: float32``
``tokenizer_source`` / ``tokenizer.source``  ``tokenizer_source`` (``base`` or a model; ``union`` is not supported)
``chat_template``           ignored with a warning: the tokenizer source's template is copied
==========================  ===========================================================================

Anything else (``slices``, ``modules``, ``passthrough``, ``nuslerp``, ``karcher``, LoRA ``model+adapter``
references, added tokens) stops with one line naming the key.
"""
from __future__ import annotations

import warnings
from typing import Any

from .errors import MergeplugError

#: mergekit merge methods that mergeplug implements under the same name.
SUPPORTED_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "multislerp", "model_stock", "sce",
)
_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
         "chat_template"}
_IGNORED_PARAMETERS = {"int8_mask"}  # mergekit's memory option; arithmetic here is float32 anyway
_DOUBLED = {("della", "epsilon"), ("della_linear", "epsilon")}


def is_mergekit(data: dict) -> bool:
    """A mergekit configuration names its method ``merge_method`` (mergeplug's: ``method``)."""
    return isinstance(data, dict) and "merge_method" in data


def convert_mergekit(data: dict, source: str) -> dict:
    """The mergeplug merge recipe equivalent to mergekit configuration ``data``."""
    for key in data:
        if key not in _KEYS:
            what = {"slices": "layer slicing (passthrough / frankenmerges)", "modules": "per-module merges"}.get(key)
            raise MergeplugError(f"{source}: {key}: mergekit's {key!r} is not supported by mergeplug"
                                 + (f" ({what})" if what else "") + f"; supported keys: {', '.join(sorted(_KEYS))}")
    method = data["merge_method"]
    if method not in SUPPORTED_METHODS:
        raise MergeplugError(f"{source}: merge_method: mergekit's {method!r} is not supported by mergeplug; "
                             f"supported: {', '.join(SUPPORTED_METHODS)}")
    out: dict[str, Any] = {"kind": "merge", "method": method}
    base = data.get("base_model")
    if base is not None:
        out["base_model"] = _model_ref(base, "base_model", source)
    takes_task_vectors = _needs_base(method)
    models = []
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeplugError(f"{source}: models[{i}]: expected {{model: ..., parameters: ...}}, got {entry!r}")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise MergeplugError(f"{source}: models[{i}].{unknown[0]}: not supported by mergeplug's mergekit dialect")
        ref = _model_ref(entry["model"], f"models[{i}].model", source)
        if takes_task_vectors and base is not None and ref == out["base_model"]:
            continue
        model = {"model": ref}
        params = _parameters(entry.get("parameters"), method, f"models[{i}].parameters", source)
        if params:
            model["parameters"] = params
        models.append(model)
    out["models"] = models
    params = _parameters(data.get("parameters"), method, "parameters", source)
    if params:
        out["parameters"] = params
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        out["dtype"] = dtype
    tokenizer_source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise MergeplugError(f"{source}: tokenizer: expected a mapping with 'source', got {tokenizer!r}")
        extra = sorted(set(tokenizer) - {"source"})
        if extra:
            raise MergeplugError(f"{source}: tokenizer.{extra[0]}: mergekit's tokenizer.{extra[0]} (added tokens, "
                                 f"padding) is not supported by mergeplug; remove it")
        tokenizer_source = tokenizer.get("source", tokenizer_source)
    if tokenizer_source is not None:
        if tokenizer_source == "union":
            raise MergeplugError(f"{source}: tokenizer_source: mergekit's 'union' (a merged vocabulary) is not "
                                 f"supported by mergeplug; use base or one of the models")
        out["tokenizer_source"] = "base" if tokenizer_source == "base" else _model_ref(tokenizer_source, "tokenizer_source", source)
    if "chat_template" in data:
        warnings.warn(f"{source}: chat_template: ignored; mergeplug copies the tokenizer source's chat template",
                      stacklevel=3)
    return out


def _model_ref(value: Any, where: str, source: str) -> str:
    if isinstance(value, dict) and set(value) <= {"model", "path"}:  # mergekit's long form {model: {path: ...}}
        value = value.get("model") or value.get("path")
        if isinstance(value, dict):
            value = value.get("path")
    if not isinstance(value, str) or not value:
        raise MergeplugError(f"{source}: {where}: expected a model path or hub id, got {value!r}")
    if "+" in value:
        raise MergeplugError(f"{source}: {where}: mergekit's 'model+lora' reference {value!r} is not supported; "
                             f"merge the adapter into its base first")
    return value


def _parameters(params: Any, method: str, where: str, source: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeplugError(f"{source}: {where}: expected a mapping of parameters, got {params!r}")
    out = {}
    for key, value in params.items():
        if key in _IGNORED_PARAMETERS:
            continue
        out[key] = _scaled(value, 2.0) if (method, key) in _DOUBLED else value
    return out


def _scaled(value: Any, factor: float) -> Any:
    """A number, gradient list or {filter, value} schedule with every number multiplied by ``factor``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value * factor
    if isinstance(value, list):
        return [_scaled(v, factor) for v in value]
    if isinstance(value, dict):
        return {k: (_scaled(v, factor) if k == "value" else v) for k, v in value.items()}
    return value


def _needs_base(method: str) -> bool:
    from .plugins import get_registry

    try:
        component = get_registry().get("merger", method)
    except MergeplugError:
        return False  # an unknown or ambiguous method is reported when the converted recipe is checked
    from .recipe import merger_needs_base

    return merger_needs_base(component)
