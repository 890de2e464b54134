"""Consensus Task Arithmetic (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", arXiv:2405.07813).

    τ_MTL = Σ_t w_t τ_t                                  task arithmetic's multi-task vector
    m_t   = |τ_t| ≥ λ_t · |τ_MTL − τ_t|                  task t's TALL mask
    c     = [Σ_t m_t ≥ k]                                positions at least k tasks use
    θ     = θ_base + λ · (τ_MTL ⊙ c)

The TALL mask keeps the weights where θ_t = θ_base + τ_t lies closer to the pre-trained weights than to the
multi-task model, scaled by λ_t. k = 2 (the paper's default) drops "catastrophic" weights no task uses and
"selfish" ones only one task uses; k = 1 drops only the catastrophic ones, k = 0 is plain task arithmetic, and
k larger than the number of models leaves the base.

Defaults: k 2 (arXiv:2405.07813); λ_t 0.4 is our choice, the middle of the grid 0.2–0.6 that the paper's code
searches per task on validation data (MergeBench, arXiv:2505.10833, uses 0.2); λ 1.0 adds the kept vector
unscaled (our choice; the paper tunes it, MergeBench uses 0.4); w_t 1.0, so τ_MTL is task arithmetic's sum
(arXiv:2212.04089). The paper's code (github.com/nik-dim/tall_masks) compares with >, we with ≥: they differ
only where both sides are equal, and where both are zero τ_MTL is zero too, so the merged value is the same.
"""
import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs, elementwise_in_chunks, weighted_sum


class ConsensusTaskArithmetic(Merger):
    needs_base = True
    stored_dtype_inputs = True  # converted a cache-sized chunk at a time, not as whole float32 copies

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        if inputs.base is None:
            raise MergeplugError(f"{inputs.name}: consensus_ta needs a base_model to take task vectors against")
        weights = inputs.weights("weight")
        lambda_t = [float(own["lambda_t"]) for own in inputs.model_parameters]
        k, scale = int(inputs.parameters["k"]), float(inputs.parameters["lambda"])
        dtype = inputs.compute_dtype or inputs.base.dtype

        def consensus(part: list[torch.Tensor]) -> torch.Tensor:
            part = [x.to(dtype) for x in part]
            base, task_vectors = part[0], [m - part[0] for m in part[1:]]
            multi_task = weighted_sum(task_vectors, weights)
            votes = torch.zeros(multi_task.shape, dtype=torch.int32, device=multi_task.device)
            for tv, lam in zip(task_vectors, lambda_t):
                votes += tv.abs() >= lam * (multi_task - tv).abs()
            return base + scale * torch.where(votes >= k, multi_task, torch.zeros_like(multi_task))

        # Every step is elementwise per position: run it a cache-sized chunk at a time.
        return elementwise_in_chunks(consensus, [inputs.base, *inputs.models], dtype=dtype)
