"""Linear merge / uniform and weighted model soup (Wortsman et al., arXiv:2203.05482).

θ = Σ_i w_i θ_i / Σ_i w_i (normalize=true, the default: the soup is an average), or Σ_i w_i θ_i.
The base model, if the recipe names one, is not used.
"""
import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs, weighted_sum


class LinearMerger(Merger):
    needs_base = False
    stored_dtype_inputs = True  # one weighted sum: each input is added as stored, no converted copy

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = inputs.weights("weight")
        merged = weighted_sum(inputs.models, weights, inputs.compute_dtype)
        if inputs.parameters["normalize"]:
            total = float(weights.sum())
            if total == 0:
                raise MergeplugError(f"{inputs.name}: linear merge with normalize=true needs weights that do not sum to 0")
            merged /= total
        return merged
