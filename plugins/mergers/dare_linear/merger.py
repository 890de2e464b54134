"""DARE with task arithmetic (Yu et al., arXiv:2311.03099).

τ̂_i = m_i ⊙ τ_i / density_i with m_i ~ Bernoulli(density_i) entry-wise (density = 1 − p, p the paper's drop
rate), then θ = θ_base + λ Σ_i w_i τ̂_i. ``rescale: false`` skips the division (the paper's ablation).

Default density 0.1, i.e. p = 0.9, MergeBench's setting (arXiv:2505.10833); λ = 1 is our choice (plain task
arithmetic; MergeBench uses 0.4). ``normalize: true`` divides the sum by Σ_i w_i (mergekit's option). Masks come
only from TensorInputs.random_key(model index), seeded by the recipe's seed, the tensor name and the model, so one
seed always gives the same bytes.
"""
import torch

from mergeplug.merging import Merger, TensorInputs, random_prune, summed_task_vectors


class DareLinearMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters
        drop = random_prune(inputs, [float(m["density"]) for m in inputs.model_parameters], bool(p["rescale"]))
        return summed_task_vectors(inputs, drop, normalize=bool(p["normalize"]), scale=float(p["lambda"]))
