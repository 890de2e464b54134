"""TIES-Merging (Yadav et al., arXiv:2306.01708).

1. Trim: keep the top ``density`` fraction of |τ_i| per model (the paper keeps the top 20%: density 0.2).
2. Elect: γ = sign(Σ_i w_i τ̂_i) (``sign_method: sum``, the paper's) or the majority of signs (``count``).
3. Disjoint merge: average (``normalize: true``, the paper's disjoint mean, weighted by ``weight``) or sum
   (``normalize: false``, MergeBench's variant, arXiv:2505.10833) the τ̂_i whose sign is γ.
θ = θ_base + λ·merged, λ = 1 by default (the paper's value when no validation set is used).

``trim_scope: tensor`` (default, mergekit's behaviour) trims each tensor on its own; ``trim_scope: model`` is the
paper's (and MergeBench's) top-k over the whole model: a streaming pre-pass finds each model's magnitude
threshold (mergeplug.merging.GlobalMagnitudeThreshold, exact up to the entries of one histogram bin, a
factor of at most 1.0005).
"""
import torch

from mergeplug import MergeplugError
from mergeplug.merging import (
    GlobalMagnitudeThreshold,
    Merger,
    TensorInputs,
    magnitude_threshold_prune,
    model_label,
    task_vector,
    ties_task_vectors,
    top_magnitudes_prune,
)

TRIM_SCOPES = ("tensor", "model")


class TiesMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def __init__(self, parameters=None):
        super().__init__(parameters)
        self.trim_scope = self.parameters.get("trim_scope", "tensor")  # parameters.json's default
        if self.trim_scope not in TRIM_SCOPES:
            raise MergeplugError(
                f"ties: trim_scope {self.trim_scope!r} is not one of tensor, model; it cannot vary by tensor")
        self.prepasses = 1 if self.trim_scope == "model" else 0
        self._counters: dict[int, GlobalMagnitudeThreshold] = {}
        self._first_density: dict[int, tuple[float, str]] = {}
        self._thresholds: list[float] | None = None

    def observe(self, inputs: TensorInputs, pass_index: int) -> None:
        if self._thresholds is not None:  # a new run with the same merger: start counting afresh
            self._counters, self._first_density, self._thresholds = {}, {}, None
        for i, params in enumerate(inputs.model_parameters):
            density = float(params["density"])
            first = self._first_density.setdefault(i, (density, inputs.name))
            if density != first[0]:
                raise MergeplugError(
                    f"ties: {model_label(inputs, i)}: density is {density} on {inputs.name} but {first[0]} on "
                    f"{first[1]}; trim_scope: model takes one density per model "
                    f"(drop the schedule, or use trim_scope: tensor)"
                )
            self._counters.setdefault(i, GlobalMagnitudeThreshold(density)).add(task_vector(inputs, i))

    def finish_observing(self, pass_index: int) -> None:
        self._thresholds = [self._counters[i].threshold() for i in sorted(self._counters)]

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters
        if self.trim_scope == "model":
            if self._thresholds is None or len(self._thresholds) != len(inputs.models):
                raise MergeplugError(
                    f"ties: {inputs.name}: trim_scope: model needs the engine's pre-pass over every tensor first")
            trim = magnitude_threshold_prune(self._thresholds)
        else:
            trim = top_magnitudes_prune(inputs, [float(m["density"]) for m in inputs.model_parameters])

        return ties_task_vectors(
            inputs, trim, sign_method=p["sign_method"], normalize=p["normalize"],
            scale=float(p["lambda"]),
        )
