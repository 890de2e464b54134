"""DELLA-Merging (Deep et al., arXiv:2406.11617): Drop, Elect, Fuse.

Drop (MAGPRUNE, mergeplug.merging.magprune): within each row of τ_i, entries ranked by magnitude r = 0..n−1 are
kept with probability p_r = density − ε/2 + ε·r/(n−1) and the kept ones divided by p_r (``rescale``). Elect:
γ = sign(Σ_i w_i τ̂_i) (or ``count``). Fuse: weighted mean (``normalize: true``, mergekit's della default and
TIES' rule) or sum of the entries agreeing with γ; θ = θ_base + λ·merged.

ε is the paper's window width (the official code's ``window_size``); mergekit's ``epsilon`` is half of it.
Defaults: density 0.7 and ε 0.14 are the official repository's example run (github.com/declare-lab/della:
drop rate 0.3, window 0.14); λ = 1 is our choice (that run uses 1.1). Randomness only from
TensorInputs.random_key(model index).
"""
import torch

from mergeplug.merging import Merger, TensorInputs, magprune_prune, ties_task_vectors


class DellaMerger(Merger):
    needs_base = True
    stored_dtype_inputs = True  # task vectors are taken a block at a time, in float32

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters
        own = inputs.model_parameters
        prune = magprune_prune(inputs, [float(m["density"]) for m in own], [float(m["epsilon"]) for m in own],
                               bool(p["rescale"]), method="della")
        return ties_task_vectors(
            inputs, prune, sign_method=p["sign_method"], normalize=p["normalize"],
            scale=float(p["lambda"]),
        )
