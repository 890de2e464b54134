"""Per-tensor parameter resolution: layer gradients and tensor-name filters, with mergekit's semantics.

A parameter's value in a recipe is a plain value, or a schedule:

- a list of numbers ``[v_0, ..., v_{n-1}]``: a gradient over layer depth. The points sit evenly on [0, 1]
  and the value at depth ``t`` is ``np.interp(t, linspace(0, 1, n), values)``, with ``t = layer /
  (num_layers - 1)`` for a tensor of transformer block ``layer`` (``t = 1`` when there is a single layer).
  As in mergekit (``mergekit/plan.py``), tensors before the blocks (embeddings) take ``t = 0`` and tensors
  after them (final norm, ``lm_head``) take ``t = 1``.
- a list of ``{filter, value}`` entries: the first entry whose ``filter`` is a substring of the tensor name
  wins; an entry without ``filter`` is the fallback. The ``value`` may itself be a gradient list.

Which values are schedules is decided by the component's parameter schema: a list given for a parameter
whose schema type is ``array`` is a plain value, never a schedule.
"""
from __future__ import annotations

from typing import Any

from .errors import MergeplugError


def depth(layer: int | None, num_layers: int | None, *, before_blocks: bool = False) -> float:
    """Relative depth t in [0, 1] of a tensor (see the module docstring)."""
    if layer is None or not num_layers:
        return 0.0 if before_blocks else 1.0
    if num_layers <= 1:
        return 1.0
    return min(max(layer / (num_layers - 1), 0.0), 1.0)


def gradient(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of ``values`` placed evenly on [0, 1], at ``t`` (np.interp semantics)."""
    if len(values) == 1:
        return float(values[0])
    position = t * (len(values) - 1)
    low = min(int(position), len(values) - 2)
    frac = position - low
    return float(values[low]) * (1.0 - frac) + float(values[low + 1]) * frac


def is_schedule(value: Any, prop: dict | None) -> bool:
    """Whether ``value`` is a schedule for a parameter with schema ``prop``: a list, unless the parameter
    itself is an array."""
    if not isinstance(value, list):
        return False
    types = (prop or {}).get("type")
    types = types if isinstance(types, list) else [types]
    return "array" not in types


def resolve_value(value: Any, tensor_name: str, t: float, *, key: str = "parameter") -> Any:
    """The value of one (possibly scheduled) parameter for tensor ``tensor_name`` at depth ``t``."""
    if not isinstance(value, list):
        return value
    if value and all(isinstance(entry, dict) for entry in value):
        fallback = None
        for entry in value:
            if "filter" not in entry:
                if fallback is None:
                    fallback = entry
            elif entry["filter"] in tensor_name:
                return resolve_value(entry["value"], tensor_name, t, key=key)
        if fallback is None:
            raise MergeplugError(f"parameter {key}: no schedule entry matches tensor {tensor_name} and there is no "
                                 f"fallback entry (one without 'filter'); add one")
        return resolve_value(fallback["value"], tensor_name, t, key=key)
    if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return gradient(value, t)
    raise MergeplugError(f"parameter {key}: a schedule is a list of numbers or a list of {{filter, value}} entries, "
                         f"got {value!r}")


def resolve_parameters(values: dict[str, Any], schema: dict | None, tensor_name: str, t: float) -> dict[str, Any]:
    """``values`` with every scheduled parameter replaced by its value for this tensor."""
    props = (schema or {}).get("properties", {})
    out = {}
    for key, value in values.items():
        prop = props.get(key)
        if is_schedule(value, prop):
            value = resolve_value(value, tensor_name, t, key=key)
            if (prop or {}).get("type") == "integer" and isinstance(value, float):
                value = int(round(value))  # a gradient of an integer parameter, rounded to the nearest
        out[key] = value
    return out


def has_schedule(values: dict[str, Any], schema: dict | None) -> bool:
    props = (schema or {}).get("properties", {})
    return any(is_schedule(v, props.get(k)) for k, v in values.items())
