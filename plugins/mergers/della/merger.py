"""DELLA-Merging (Deep et al., arXiv:2406.11617): Drop, Elect, Fuse.

Drop (MAGPRUNE, mergeplug.merging.magprune): within each row of τ_i, entries ranked by magnitude r = 0..n−1 are
kept with probability p_r = density − ε/2 + ε·r/(n−1) and the kept ones divided by p_r (``rescale``). Elect:
γ = sign(Σ_i w_i τ̂_i) (or ``count``). Fuse: weighted mean (``normalize: true``, mergekit's della default and
TIES' rule) or sum of the entries agreeing with γ; θ = θ_base + λ·merged.

ε is the paper's window width (the official code's ``window_size``); mergekit's ``epsilon`` is half of it.
Defaults: density 0.7 and ε 0.14 are the official repository's example run (github.com/declare-lab/della:
drop rate 0.3, window 0.14); λ = 1 is our choice (that run uses 1.1). Randomness only from
TensorInputs.generator(model index).
"""
import torch

from mergeplug.merging import Merger, TensorInputs, magprune, model_label, ties_task_vectors


class DellaMerger(Merger):
    needs_base = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        p = inputs.parameters
        generators = [inputs.generator(i) for i in range(len(inputs.models))]  # drawn from chunk after chunk
        row = inputs.models[0].shape[-1] if inputs.models[0].dim() else 1  # MAGPRUNE ranks within rows

        def prune(i, chunk):
            params = inputs.model_parameters[i]
            return magprune(chunk.view(-1, row), float(params["density"]), float(params["epsilon"]), generators[i],
                            bool(p["rescale"]), where=f"della: {inputs.name}: {model_label(inputs, i)}").reshape(-1)

        return ties_task_vectors(
            inputs, prune, sign_method=p["sign_method"], normalize=p["normalize"],
            scale=float(p["lambda"]),
        )
