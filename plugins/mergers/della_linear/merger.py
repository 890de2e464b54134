"""DELLA's MAGPRUNE with plain task arithmetic (Deep et al., arXiv:2406.11617; as mergekit's della_linear).

τ̂_i = MAGPRUNE(τ_i): within each row, entries ranked by magnitude r = 0..n−1 are kept with probability
p_r = density − ε/2 + ε·r/(n−1) and divided by p_r (``rescale``); θ = θ_base + λ Σ_i w_i τ̂_i.
ε = 0 is DARE. ``normalize: true`` divides the sum by Σ_i w_i (mergekit's option).

ε is the paper's window width (mergekit's ``epsilon`` is half of it). Defaults: density 0.7 and ε 0.14 from the
official repository's example run (github.com/declare-lab/della); λ = 1 is our choice.
"""
import torch

from mergeplug.merging import Merger, TensorInputs, magprune_prune, summed_task_vectors


class DellaLinearMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters
        own = inputs.model_parameters
        prune = magprune_prune(inputs, [float(m["density"]) for m in own], [float(m["epsilon"]) for m in own],
                               bool(p["rescale"]), method="della_linear")
        return summed_task_vectors(inputs, prune, normalize=bool(p["normalize"]), scale=float(p["lambda"]))
