"""SCE: Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990),
per parameter tensor, over the task vectors τ_i = θ_i − θ_base of N ≥ 2 models.

    Select:    S = the top `select_topk` fraction of positions by Var_i(τ_i) (population variance across the
               models); τ'_i = τ_i ⊙ S
    Calculate: η_i = Σ τ'_i² / Σ_j Σ τ'_j²   (equal weights 1/N when every τ'_i is zero)
    Erase:     γ = sign(Σ_i x_i); keep x_i only where sign(x_i) = γ (TIES' election, arXiv:2306.01708)

Three forms are in use; `variant` picks one (agree_i: x_i kept by Erase, nonzero):
  paper     x = τ';  θ = θ_base + Σ_i η_i x_i[agree_i]                                    (arXiv:2408.07990)
  mergekit  x = τ';  θ = θ_base + Σ_i η_i x_i[agree_i] / Σ_i η_i [agree_i]           (mergekit's `sce`)
  fusechat  x = τ;   θ = θ_base + Σ_i η_i x_i[agree_i] / Σ_i η_i [agree_i]           (FuseChat's mergekit fork)
that is, the two implementations divide by the weight that survives Erase at each position, and FuseChat's
uses the selection only to compute η, erasing and merging the full task vectors. Where no model survives the
base is kept. Where Σ_i x_i is exactly zero no sign is elected and the base is kept there (both codes elect + at
such positions).

Default select_topk 0.1: FuseChat's released SCE recipe (fusechat-sce.yml, select_topk 0.1) for
arXiv:2408.07990; mergekit defaults to 1.0 (no selection). The fraction is of all positions of the tensor, as
the paper states it (top τ%); both codes take it of the positions whose variance is nonzero, which differs only
where models leave many positions identical. select_topk 1 selects every position. Default variant: paper.
"""
import torch

from mergeplug import MergeplugError
from mergeplug.merging import (
    ELEMENTWISE_CHUNK,
    Merger,
    TensorInputs,
    TopMagnitudes,
    elementwise_in_chunks,
    task_vector,
    ties_merge,
    weighted_sum,
)


class SCE(Merger):
    needs_base = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        n = len(inputs.models)
        if n < 2:
            raise MergeplugError(
                f"sce: {inputs.name}: needs at least two models besides the base_model (it selects positions by "
                f"the variance across models), got {n}"
            )
        if inputs.base is None:
            task_vector(inputs, 0)  # raises the missing-base error
        # Every step but the top-k is per position: run them a cache-sized chunk at a time, so no full-size task
        # vector exists; the selection is kept as one byte per position.
        size, flat = inputs.base.numel(), [t.reshape(-1) for t in (inputs.base, *inputs.models)]
        spans = [(s, min(s + ELEMENTWISE_CHUNK, size)) for s in range(0, size, ELEMENTWISE_CHUNK)]

        def task_vectors(span):
            base = flat[0][span[0]:span[1]]
            return [m[span[0]:span[1]] - base for m in flat[1:]]

        def variances():
            return (_variance(task_vectors(span)) for span in spans)

        top = TopMagnitudes(variances, int(round(float(inputs.parameters["select_topk"]) * size)), size)
        selection = torch.cat([top.mask(v) for v in variances()])

        energy = torch.zeros(n, dtype=torch.float64)
        for span in spans:
            chosen = selection[span[0]:span[1]]
            for i, tv in enumerate(task_vectors(span)):
                energy[i] += float(tv.masked_fill_(~chosen, 0).square().sum())
        weights = energy / energy.sum() if float(energy.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        variant = inputs.parameters["variant"]
        votes = torch.ones(n, dtype=weights.dtype)  # Erase is TIES' election, one equal vote per model

        def erase_and_merge(part: list[torch.Tensor]) -> torch.Tensor:
            base, chosen = part[0], part[1]
            tvs = [m - base for m in part[2:]]
            if variant != "fusechat":  # FuseChat's fork erases and merges the unselected task vectors
                tvs = [tv.masked_fill_(~chosen, 0) for tv in tvs]
            return base + ties_merge(tvs, weights, normalize=variant != "paper", vote_weights=votes)

        return elementwise_in_chunks(erase_and_merge, [inputs.base, selection.view_as(inputs.base), *inputs.models])


def _variance(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models at each position, in two passes of running sums (no N-fold stack)."""
    n = len(task_vectors)
    mean = weighted_sum(task_vectors, torch.full((n,), 1.0 / n))
    variance = torch.zeros_like(mean)
    for tv in task_vectors:
        variance += (tv - mean).square()
    return variance / n
