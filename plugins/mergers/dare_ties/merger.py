"""DARE as the pruning step of TIES-Merging (Yu et al., arXiv:2311.03099; TIES: arXiv:2306.01708).

τ̂_i = m_i ⊙ τ_i / density_i with m_i ~ Bernoulli(density_i) (``rescale: false`` skips the division); then the
TIES sign election γ = sign(Σ_i w_i τ̂_i) (or ``count``) and disjoint merge of the τ̂_i agreeing with γ: a
weighted mean (``normalize: true``, TIES' disjoint mean, which the DARE paper keeps) or sum (``false``:
mergekit's dare_ties default and MergeBench's TIES variant); θ = θ_base + λ·merged.

Default density 0.1 (p = 0.9, MergeBench's setting, arXiv:2505.10833); λ = 1 is our choice. Masks come only from
TensorInputs.random_key(model index): one seed, one result.
"""
import torch

from mergeplug.merging import Merger, TensorInputs, random_prune, ties_task_vectors


class DareTiesMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters
        drop = random_prune(inputs, [float(m["density"]) for m in inputs.model_parameters], bool(p["rescale"]))
        return ties_task_vectors(
            inputs, drop, sign_method=p["sign_method"], normalize=p["normalize"],
            scale=float(p["lambda"]),
        )
