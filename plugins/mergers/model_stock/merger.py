"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", arXiv:2403.19522).

Per tensor (or per row with filter_wise: true):

    cos θ = mean over pairs i < j of cos(τ_i, τ_j)          N ≥ 2 models
    t     = N cos θ / (1 + (N − 1) cos θ)
    θ     = t · mean_i θ_i + (1 − t) · θ_base  =  θ_base + t · mean_i τ_i

The paper derives t for one angle shared by every pair; with N > 2 we average the pairwise cosines, as mergekit
does. Two choices of ours, for cases the paper's geometry (fine-tuned weights on a shell around a centre,
angles below 90°) does not cover:
  - cos θ is clamped to [0, 1], so t stays in [0, 1]: orthogonal or opposed task vectors give the base, and t
    never meets the pole at cos θ = −1/(N − 1);
  - a pair with a zero task vector (a model that left this tensor or row untouched) counts as orthogonal,
    cos = 0, pulling t toward the base; when every task vector is zero the result is the base.
filter_wise (mergekit's option) computes t per row of the last dimension; a 1-D tensor is one row. Its default,
false, is the paper's per-layer t.
"""
import itertools

import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs, weighted_sum


class ModelStock(Merger):
    needs_base = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        n = len(inputs.models)
        if n < 2:
            raise MergeplugError(
                f"model_stock: {inputs.name}: needs at least two models besides the base_model (it measures the "
                f"angle between their task vectors), got {n}"
            )
        shape = inputs.base.shape
        filter_wise = bool(inputs.parameters["filter_wise"]) and len(shape) > 1
        rows = [tv.reshape(-1, shape[-1]) if filter_wise else tv.reshape(1, -1) for tv in inputs.task_vectors()]
        norms = [r.norm(dim=-1) for r in rows]
        cos_sum = torch.zeros_like(norms[0])
        for i, j in itertools.combinations(range(n), 2):
            norm_product = norms[i] * norms[j]
            dot = (rows[i] * rows[j]).sum(dim=-1)
            cos_sum += torch.where(norm_product > 0, dot / norm_product, 0.0)
        cos = (cos_sum / (n * (n - 1) / 2)).clamp(0.0, 1.0)
        ratio = n * cos / (1 + (n - 1) * cos)
        mean_tv = weighted_sum(rows, torch.full((n,), 1.0 / n))
        return inputs.base + (ratio.unsqueeze(-1) * mean_tv).reshape(shape)
