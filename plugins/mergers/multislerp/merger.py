"""Multi-model spherical interpolation: the weighted spherical average of Buss & Fillmore ("Spherical averages
and applications to spherical splines and interpolation", ACM TOG 2001, https://doi.org/10.1145/502122.502124),
per tensor on the flattened weights, the multi-model form of slerp (mergekit's `multislerp` serves the same
purpose with a one-step tangent-space approximation, which is not slerp for two models).

Vectors v_i: the models' task vectors τ_i when the recipe names a base_model (the result is θ_base + the
average), else the models' weights. Weights w_i ≥ 0 are normalised to sum to 1; models of weight 0 drop out.

 1. Directions u_i = v_i / |v_i|. Their weighted spherical average q minimises Σ w_i arccos(u_i·q)²; Buss and
    Fillmore's algorithm A1 finds it by repeating q ← exp_q(Σ_i w_i log_q(u_i)) from the normalised weighted
    mean, where log_q(u) = (ω / sin ω)(u − cos ω · q), ω = arccos(u·q), and exp_q(v) = cos|v| q + sin|v| v/|v|.
 2. q stays a combination Σ_i c_i u_i, so the iteration runs on the N coefficients c and the N×N Gram matrix
    of the directions (one pass over the tensor; the loop costs nothing).
 3. As slerp does, the coefficients multiply the vectors themselves: result = Σ_i c_i v_i.

With two models and weights (1 − t, t), q is the point at fraction t of the arc and c = (sin((1 − t)Ω),
sin(tΩ)) / sin Ω, which is slerp. Like slerp, when every pair of directions is (nearly) colinear,
|cos| > 0.9995 (mergekit's DOT_THRESHOLD), or some vector has norm ≤ 1e-8 and so no direction, the result is
the weighted average Σ_i w_i v_i. A direction opposite to the running average, or directions whose weighted mean
cancels, leave the spherical average undefined: a clear error, never a silent fallback.
"""
import itertools
import math

import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs, weighted_sum

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
MAX_ITERATIONS = 1000
TOLERANCE = 1e-12  # radians of the last tangent step


class MultiSlerp(Merger):
    needs_base = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = inputs.weights("weight").double().cpu()
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise MergeplugError(
                f"multislerp: {inputs.name}: weights must be >= 0 with a positive sum, got {weights.tolist()}"
            )
        vectors = inputs.task_vectors() if inputs.base is not None else list(inputs.models)
        kept = [i for i, w in enumerate(weights.tolist()) if w > 0]
        vectors = [vectors[i] for i in kept]
        weights = weights[kept] / weights[kept].sum()
        merged = weighted_sum(vectors, spherical_coefficients(vectors, weights, inputs.name))
        return merged if inputs.base is None else inputs.base + merged


def spherical_coefficients(vectors: list[torch.Tensor], weights: torch.Tensor, name: str) -> torch.Tensor:
    """c (float64, CPU) such that Σ_i c_i u_i is the weighted spherical average of the directions u_i."""
    n = len(vectors)
    flat = [v.reshape(-1) for v in vectors]
    gram = torch.empty(n, n, dtype=torch.float64)
    for i, j in itertools.combinations_with_replacement(range(n), 2):
        gram[i, j] = gram[j, i] = float(torch.dot(flat[i], flat[j]))
    norms = gram.diagonal().clamp_min(0).sqrt()
    if n == 1 or bool((norms <= NORM_EPS).any()):
        return weights
    cosines = (gram / torch.outer(norms, norms)).clamp(-1.0, 1.0)
    if bool((cosines.abs() > DOT_THRESHOLD).all()):
        return weights

    def on_sphere(c: torch.Tensor) -> torch.Tensor:
        length_sq = float(c @ cosines @ c)
        if length_sq <= NORM_EPS**2:
            raise MergeplugError(
                f"multislerp: {name}: the models' weighted directions cancel out, so their spherical average is "
                f"undefined; change the weights or merge these models with linear"
            )
        return c / math.sqrt(length_sq)

    c = on_sphere(weights.clone())
    for _ in range(MAX_ITERATIONS):
        along = (cosines @ c).clamp(-1.0, 1.0)  # u_i · q
        if bool((along < -DOT_THRESHOLD).any()):
            raise MergeplugError(
                f"multislerp: {name}: a model's direction is opposite to the others' spherical average, where the "
                f"average is undefined; change the weights or merge these models with linear"
            )
        angle = torch.arccos(along)
        pull = weights * torch.where(angle > 0, angle / torch.sin(angle), torch.ones_like(angle))
        tangent = pull - float(pull @ along) * c  # Σ_i w_i log_q(u_i), as coefficients of the u_i
        step = math.sqrt(max(float(tangent @ cosines @ tangent), 0.0))
        if step < TOLERANCE:
            return c
        c = on_sphere(math.cos(step) * c + math.sin(step) / step * tangent)
    raise MergeplugError(
        f"multislerp: {name}: the spherical average did not converge in {MAX_ITERATIONS} steps (Buss and "
        f"Fillmore's iteration needs the directions within a hemisphere); merge these models with linear"
    )
