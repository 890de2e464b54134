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
from mergeplug.merging import Merger, TensorInputs, TopVariance, task_vector, ties_task_vectors


class SCE(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        n = len(inputs.models)
        if n < 2:
            raise MergeplugError(
                f"sce: {inputs.name}: needs at least two models besides the base_model (it selects positions by "
                f"the variance across models), got {n}"
            )
        if inputs.base is None:
            task_vector(inputs, 0)  # raises the missing-base error
        selection = TopVariance(inputs, float(inputs.parameters["select_topk"]))
        energy = selection.energy()
        weights = energy / energy.sum() if float(energy.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        variant = inputs.parameters["variant"]
        return ties_task_vectors(
            inputs, None, sign_method="sum", normalize=variant != "paper", scale=1.0, weights=weights,
            vote_weights=torch.ones(n, dtype=weights.dtype),  # Erase is TIES' election, one equal vote per model
            selection=None if variant == "fusechat" else selection,  # FuseChat's fork erases nothing
        )
