"""Localize-and-Stitch, dataless localization (He et al., arXiv:2408.13656, Algorithm 1).

    Localize: m_i = the top `sparsity` fraction of |τ_i|, over the whole model (scope: model, the paper's) or
              within each tensor (scope: tensor)
    Stitch:   θ = θ_base + Σ_i m_i ⊙ τ_i / Σ_i m_i     where Σ_i m_i > 0, θ_base elsewhere

Overlaps are averaged over the number of masks covering each position, as the paper's Algorithm 1 says;
MergeBench's implementation (arXiv:2505.10833) divides overlaps by 2 whatever their count, which we do not
copy. There is no scaling coefficient. With scope: model the engine runs one streaming pre-pass that feeds each
model's |τ_i| into a histogram (mergeplug.merging.GlobalMagnitudeThreshold), so the threshold is exact up to
the entries of one histogram bin (a relative width of 0.06%); sparsity must then be one value for every tensor.

Default sparsity 0.1: MergeBench's setting for this method (arXiv:2505.10833); the paper's data-driven masks
keep about 1% of the parameters. Default scope model: the paper's top-k over the whole task vector.
"""
import torch

from mergeplug import MergeplugError
from mergeplug.merging import GlobalMagnitudeThreshold, Merger, TensorInputs, magnitude_threshold_mask, topk_mask


class LocalizeAndStitch(Merger):
    needs_base = True

    def __init__(self, parameters=None):
        super().__init__(parameters)
        self.scope = self.parameters["scope"]
        self.prepasses = 1 if self.scope == "model" else 0
        self._sparsity: float | None = None
        self._histograms: list[GlobalMagnitudeThreshold] = []
        self._thresholds: list[float] | None = None

    def observe(self, inputs: TensorInputs, pass_index: int) -> None:
        sparsity = float(inputs.parameters["sparsity"])
        if self._sparsity is None:
            self._sparsity = sparsity
            self._histograms = [GlobalMagnitudeThreshold(sparsity) for _ in inputs.models]
        elif sparsity != self._sparsity:
            raise MergeplugError(
                f"localize_stitch: {inputs.name}: sparsity {sparsity} differs from {self._sparsity} on earlier "
                f"tensors; with scope: model the mask is one top-k over the whole model, so give one sparsity "
                f"(or use scope: tensor for per-layer values)"
            )
        for histogram, tv in zip(self._histograms, inputs.task_vectors()):
            histogram.add(tv)

    def finish_observing(self, pass_index: int) -> None:
        self._thresholds = [histogram.threshold() for histogram in self._histograms]

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        task_vectors = inputs.task_vectors()
        if self.scope == "model":
            if self._thresholds is None or len(self._thresholds) != len(task_vectors):
                raise MergeplugError(
                    f"localize_stitch: {inputs.name}: scope: model needs the engine's pre-pass over every model "
                    f"before merging (observe, then finish_observing)"
                )
            masks = [magnitude_threshold_mask(tv, cut) for tv, cut in zip(task_vectors, self._thresholds)]
        else:
            masks = [topk_mask(tv, float(inputs.parameters["sparsity"])) for tv in task_vectors]
        stitched = torch.zeros_like(inputs.base)
        coverage = torch.zeros_like(inputs.base)
        for tv, mask in zip(task_vectors, masks):
            stitched += torch.where(mask, tv, torch.zeros_like(tv))
            coverage += mask
        # stitched is already zero where no mask covers a position, so clamping the count only avoids 0/0.
        return inputs.base + stitched / coverage.clamp_min(1)
