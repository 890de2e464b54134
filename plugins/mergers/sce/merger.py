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
from mergeplug.merging import Merger, TensorInputs, ties_merge, topk_mask, weighted_sum


class SCE(Merger):
    needs_base = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        task_vectors = inputs.task_vectors()
        n = len(task_vectors)
        if n < 2:
            raise MergeplugError(
                f"sce: {inputs.name}: needs at least two models besides the base_model (it selects positions by "
                f"the variance across models), got {n}"
            )
        selection = topk_mask(_variance(task_vectors), float(inputs.parameters["select_topk"]))
        selected = [torch.where(selection, tv, torch.zeros_like(tv)) for tv in task_vectors]
        energy = torch.tensor([float(tv.square().sum()) for tv in selected], dtype=torch.float64)
        weights = energy / energy.sum() if float(energy.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        variant = inputs.parameters["variant"]
        erased = task_vectors if variant == "fusechat" else selected
        votes = torch.ones(n, dtype=weights.dtype)  # Erase is TIES' election, one equal vote per model
        merged = ties_merge(erased, weights, normalize=variant != "paper", vote_weights=votes)
        return inputs.base + merged


def _variance(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models at each position, in two passes of running sums (no N-fold stack)."""
    n = len(task_vectors)
    mean = weighted_sum(task_vectors, torch.full((n,), 1.0 / n))
    variance = torch.zeros_like(mean)
    for tv in task_vectors:
        variance += (tv - mean).square()
    return variance / n
