"""Spherical linear interpolation, SLERP (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242), per tensor on the flattened weights.

Endpoints: v0 = base_model and v1 = the one model, or, without a base_model, v0 and v1 = the two models in
recipe order. With Ω the angle between v0 and v1,

    θ = sin((1 − t) Ω) / sin Ω · v0 + sin(t Ω) / sin Ω · v1

so t = 0 gives v0 and t = 1 gives v1. As in mergekit, the coefficients come from the angle between the
directions and multiply the weights themselves (their norms are not normalised away). When the directions are
(nearly) colinear, |cos Ω| > 0.9995 (mergekit's DOT_THRESHOLD), sin Ω is too small to divide by and the result
is the linear interpolation (1 − t) v0 + t v1, its limit; an endpoint with norm ≤ 1e-8 has no direction and
gets the same fallback. t is a global parameter, which the engine may schedule per layer; default 0.5, the
midpoint (our choice; mergekit requires it).
"""
import math

import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


class Slerp(Merger):
    needs_base = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        v0, v1 = _endpoints(inputs)
        t = float(inputs.parameters["t"])
        norm0, norm1 = float(v0.norm()), float(v1.norm())
        if norm0 <= NORM_EPS or norm1 <= NORM_EPS:
            return torch.lerp(v0, v1, t)
        cos = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (norm0 * norm1)
        if abs(cos) > DOT_THRESHOLD:
            return torch.lerp(v0, v1, t)
        omega = math.acos(cos)
        return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def _endpoints(inputs: TensorInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.base is not None and len(inputs.models) == 1:
        return inputs.base, inputs.models[0]
    if inputs.base is None and len(inputs.models) == 2:
        return inputs.models[0], inputs.models[1]
    raise MergeplugError(
        f"slerp: {inputs.name}: needs exactly two endpoints, a base_model and one model or two models without a "
        f"base_model; got {'a base_model and ' if inputs.base is not None else ''}{len(inputs.models)} model(s) "
        f"(use multislerp for more)"
    )
