"""Model Breadcrumbs masks (Davari & Belilovsky, arXiv:2312.06795) merged the TIES way (arXiv:2306.01708).

Each task vector is masked per tensor as in ``breadcrumbs`` (drop the ``gamma`` largest-magnitude fraction, keep
the next ``density`` fraction), then the TIES sign election γ = sign(Σ_i w_i τ̂_i) (or ``count``) and disjoint
merge of the entries agreeing with γ: weighted mean (``normalize: true``, TIES' rule) or sum (``false``,
mergekit's breadcrumbs_ties default); θ = θ_base + λ·merged. The combination is mergekit's; the Breadcrumbs
paper itself adds masked task vectors.

Defaults (our choice, see ``breadcrumbs``): density 0.9, gamma 0.01 (mergekit's), λ 1.
"""
import torch

from mergeplug.merging import Merger, TensorInputs, breadcrumbs_prune, ties_task_vectors


class BreadcrumbsTiesMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters

        own = inputs.model_parameters
        crumbs = breadcrumbs_prune(inputs, [float(m["density"]) for m in own], [float(m["gamma"]) for m in own])
        return ties_task_vectors(
            inputs, crumbs, sign_method=p["sign_method"], normalize=p["normalize"],
            scale=float(p["lambda"]),
        )
