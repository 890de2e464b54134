"""Model Breadcrumbs (Davari & Belilovsky, arXiv:2312.06795).

Per tensor ("layer-wise", as the paper masks), each task vector loses its ``gamma`` fraction of largest-magnitude
entries (outliers) and keeps the next ``density`` fraction; the smallest entries are dropped too
(mergeplug.merging.breadcrumbs_mask). Then task arithmetic: θ = θ_base + λ Σ_i w_i (m_i ⊙ τ_i).

Defaults are our choice, as the paper's tuned values are for ViT/T5 and its body could not be checked here:
density 0.9 and gamma 0.01 are mergekit's documented example (docs/merge_methods.md; gamma 0.01 is also its code
default); the authors' code (github.com/rezazzr/breadcrumbs) searches keep ∈ [0.05, 0.2] and outliers ∈
[0.001, 0.01], masking per row. λ = 1 is plain task arithmetic. density is the fraction kept in the end: with
gamma + density > 1 fewer outliers are dropped (mergekit's rule). ``normalize: true`` divides the sum by Σ_i w_i
(mergekit's option).
"""
import torch

from mergeplug.merging import Merger, TensorInputs, breadcrumbs_prune, summed_task_vectors


class BreadcrumbsMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        own = inputs.model_parameters
        crumbs = breadcrumbs_prune(inputs, [float(m["density"]) for m in own], [float(m["gamma"]) for m in own])
        return summed_task_vectors(
            inputs, crumbs, normalize=bool(inputs.parameters["normalize"]),
            scale=float(inputs.parameters["lambda"]),
        )
