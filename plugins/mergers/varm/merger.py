"""VaRM, Variation Ratio Merge (Wan et al., "Knowledge Fusion of Chat LLMs: A Preliminary Technical Report",
arXiv:2402.16107, its VaRM section), per parameter matrix m:

    W_i,m = E_m[Δθ_i,m²] / Σ_j E_m[Δθ_j,m²]        Δθ_i,m = θ_i,m − θ_base,m  (the update by fine-tuning)
    θ_m   = Σ_i W_i,m θ_i,m  =  θ_base,m + Σ_i W_i,m Δθ_i,m

E_m is the mean over the matrix's entries. A matrix no model updated has no variation to compare: every model
then gets 1/N (our choice; the result is the base either way). Note: the released code (FuseChat
merge/VaRM/merge.py) reads the same analysis file for every model, so every model gets the same statistic and
the weights come out uniform, a plain average; here each model's own update sets its weight.
"""
import torch

from mergeplug.merging import Merger, TensorInputs, weighted_sum


class VaRM(Merger):
    needs_base = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        task_vectors = inputs.task_vectors()
        variation = torch.tensor([float(tv.square().mean()) for tv in task_vectors], dtype=torch.float64)
        total = float(variation.sum())
        weights = variation / total if total > 0 else torch.full_like(variation, 1.0 / len(task_vectors))
        return inputs.base + weighted_sum(task_vectors, weights)
