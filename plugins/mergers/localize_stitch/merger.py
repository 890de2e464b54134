"""Localize-and-Stitch, dataless localization (He et al., arXiv:2408.13656, Algorithm 1).

    Localize: m_i = the top `sparsity` fraction of |τ_i|, over the whole model (scope: model, the paper's) or
              within each tensor (scope: tensor)
    Stitch:   θ = θ_base + Σ_i m_i ⊙ τ_i / Σ_i m_i     where Σ_i m_i > 0, θ_base elsewhere

Overlaps are averaged over the number of masks covering each position, as the paper's Algorithm 1 says;
MergeBench's implementation (arXiv:2505.10833) divides overlaps by 2 whatever their count, which we do not
copy. There is no scaling coefficient. With scope: model the engine runs one streaming pre-pass that feeds each
model's |τ_i| into a histogram (mergeplug.merging.GlobalMagnitudeThreshold), so the threshold is exact up to
the entries of one histogram bin (a relative width of at most 0.05%); sparsity must then be one value for
every tensor.

Default sparsity 0.1: MergeBench's setting for this method (arXiv:2505.10833); the paper's data-driven masks
keep about 1% of the parameters. Default scope model: the paper's top-k over the whole task vector.
"""
import torch

from mergeplug import MergeplugError
from mergeplug.merging import (
    GlobalMagnitudeThreshold,
    Merger,
    TensorInputs,
    elementwise_in_chunks,
    magnitude_threshold_mask,
    task_vector,
    top_magnitudes_keep,
)


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
        for i, histogram in enumerate(self._histograms):  # one task vector alive at a time
            histogram.add(task_vector(inputs, i))

    def finish_observing(self, pass_index: int) -> None:
        self._thresholds = [histogram.threshold() for histogram in self._histograms]

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        if self.scope == "model":
            if self._thresholds is None or len(self._thresholds) != len(inputs.models):
                raise MergeplugError(
                    f"localize_stitch: {inputs.name}: scope: model needs the engine's pre-pass over every model "
                    f"before merging (observe, then finish_observing)"
                )
            thresholds = self._thresholds

            def keep(i, chunk):
                return magnitude_threshold_mask(chunk, thresholds[i])
        else:
            keep = top_magnitudes_keep(inputs, [float(inputs.parameters["sparsity"])] * len(inputs.models))

        def stitch(part: list[torch.Tensor]) -> torch.Tensor:
            base = part[0]
            stitched, coverage = torch.zeros_like(base), torch.zeros_like(base)
            for i, model in enumerate(part[1:]):
                tv = model - base
                mask = keep(i, tv)
                stitched += tv.mul_(mask)  # multiplying by the mask: faster on CPU than where()
                coverage += mask
            # stitched is already zero where no mask covers a position, so clamping the count only avoids 0/0.
            return base + stitched / coverage.clamp_min(1)

        if inputs.base is None:
            task_vector(inputs, 0)  # raises the missing-base error
        return elementwise_in_chunks(stitch, [inputs.base, *inputs.models])
