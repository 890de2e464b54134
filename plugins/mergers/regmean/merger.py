"""RegMean (Jin et al., arXiv:2212.09849), with MergeBench's settings (arXiv:2505.10833).

Statistic ``gram``: for every ``nn.Linear`` of the model, G = XᵀX / n, where X (n × in_features) stacks the
layer's inputs at every token position of every sample of the model's own data, and n is that number of token
positions (all of them, prompt and response: the layer sees them all; arXiv:2212.09849 normalises by the
number of examples, a scale that cancels in the solve when every model has the same n, so per-token averaging
keeps models with longer data from dominating). Forward hooks add xᵀx per layer as the batches pass, so no
activation is stored; padded positions of a batch are left out, so batching does not change G. Layers fed
the very same input tensor (q/k/v, gate/up) share one Gram, computed once (a quarter of a Llama's Gram work).
Keyed by the linear's weight name (``model.layers.0.self_attn.q_proj.weight``). An output
layer tied to the input embeddings is skipped: its weight is the embedding matrix, which is not a linear map of
the data's hidden states alone, and it is merged by the mean like the embeddings (arXiv:2212.09849 merges only
the linear layers of the encoder); an untied output layer gets a Gram like any linear.

Merge, for a tensor where every model has a Gram: G̃_i = α G_i + (1 − α) diag(G_i) (off-diagonals scaled by α,
arXiv:2212.09849 §3.3), then W = ((Σ_i w_i G̃_i)^-1 Σ_i w_i G̃_i W_iᵀ)ᵀ, solved in float64 (W_i is out × in).
With α = 1 and equal weights this is argmin_W Σ_i ||X_i Wᵀ − X_i W_iᵀ||². When Σ w_i G̃_i is singular (an
input feature no model's data ever excites) the solve gets a ridge λ = 1e-8 · mean(diag) (our choice) pulled
toward the weighted mean, so such a feature's column takes the mean of the models' columns instead of zero.
Every other tensor (norms, embeddings, biases, a tied output layer) gets the weighted mean Σ w_i θ_i / Σ w_i.
"""
from __future__ import annotations

import weakref

import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs, model_label, weighted_sum

#: Relative ridge added to a singular Gram sum, times its mean diagonal entry (our choice: small enough not to
#: move a well-posed solution, large enough for float64).
RIDGE = 1e-8


class RegMeanMerger(Merger):
    needs_base = False
    statistic = "gram"
    statistic_parameters = ("samples", "max_length")
    statistic_shape = "any"  # a Gram matrix is [in, in], not its weight's [out, in]

    def compute_statistic(self, model, batches, settings) -> dict[str, torch.Tensor]:
        linears = gram_layers(model)
        grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
                 for name, m in linears.items()}
        tokens = 0
        real = None  # the current batch's unpadded positions, flattened: padding never enters a Gram
        # Layers handed the same input tensor object in one forward (q/k/v, gate/up) get the same xᵀx: the first
        # layer to see it computes it, the others share its Gram. Weak references, so no activation is kept
        # alive (and a freed tensor's id, reused by a new one, is not taken for it).
        this_pass: dict[int, tuple[weakref.ref, str]] = {}
        owner_of: dict[str, str] = {}  # layer -> the layer whose Gram it has (itself if its own), fixed by pass 1

        def hook_for(name):
            def accumulate(module, args, kwargs):
                raw = args[0] if args else kwargs["input"]
                seen = this_pass.get(id(raw))
                owner = seen[1] if seen is not None and seen[0]() is raw else name
                if owner == name:
                    this_pass[id(raw)] = (weakref.ref(raw), name)
                if owner_of.setdefault(name, owner) != owner:
                    raise MergeplugError(f"regmean: {name} shared its input with {owner_of[name]} in one forward pass "
                                         f"and not in another; its Gram cannot be shared")
                if owner != name:
                    return
                x = raw.detach().reshape(-1, module.in_features)
                x = x[real].float() if real is not None else x.float()
                grams[name].addmm_(x.T, x)
            return accumulate

        handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in linears.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    mask = batch.get("attention_mask")
                    real = mask.reshape(-1).bool() if mask is not None else None
                    this_pass.clear()
                    model(input_ids=batch["input_ids"], attention_mask=mask)
                    tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        finally:
            for handle in handles:
                handle.remove()
        if tokens == 0:
            raise MergeplugError("regmean: the model's data gave no tokens; give it rows with text")
        for g in grams.values():
            g.div_(tokens)
        for name, owner in owner_of.items():
            if owner != name:
                grams[name] = grams[owner].clone()  # a tensor of its own: the cache stores each name's bytes
        return grams

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = inputs.weights("weight")
        total = float(weights.sum())
        if total <= 0:
            raise MergeplugError(f"{inputs.name}: regmean needs per-model weights with a positive sum")
        grams = inputs.statistics
        if not grams or any(g is None for g in grams):
            return weighted_sum(inputs.models, weights).div_(total)
        for i, (g, w) in enumerate(zip(grams, inputs.models)):
            if w.dim() != 2 or tuple(g.shape) != (w.shape[1], w.shape[1]):
                raise MergeplugError(f"{inputs.name}: {model_label(inputs, i)}: Gram of shape {list(g.shape)} for a "
                                     f"weight of shape {list(w.shape)}; expected [in, in] for an [out, in] weight")
        return regmean_solve(inputs.models, grams, weights.tolist(), float(inputs.parameters["alpha"]))


def gram_layers(model) -> dict[str, torch.nn.Linear]:
    """The model's linear layers by weight name, without an output layer tied to the input embeddings."""
    tied = None
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and outputs.weight is inputs.weight:
        tied = outputs
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not tied}


def regmean_solve(weights_out_in: list[torch.Tensor], grams: list[torch.Tensor], model_weights: list[float],
                  alpha: float) -> torch.Tensor:
    """((Σ w_i G̃_i)^-1 Σ w_i G̃_i W_iᵀ)ᵀ with G̃_i = α G_i + (1 − α) diag(G_i) (arXiv:2212.09849 eq. 2, §3.3)."""
    dtype = weights_out_in[0].dtype
    size = grams[0].shape[0]
    lhs = torch.zeros(size, size, dtype=torch.float64, device=grams[0].device)
    rhs = torch.zeros(size, weights_out_in[0].shape[0], dtype=torch.float64, device=grams[0].device)
    mean_t = torch.zeros_like(rhs)
    for w_i, g, m in zip(weights_out_in, grams, model_weights):
        g = g.double()
        reduced = g * alpha + torch.diag(torch.diagonal(g)) * (1.0 - alpha)
        lhs.add_(reduced, alpha=m)
        rhs.addmm_(reduced, w_i.double().T, alpha=m)
        mean_t.add_(w_i.double().T, alpha=m)
    mean_t.div_(sum(model_weights))
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        scale = float(torch.diagonal(lhs).mean()) or 1.0
        ridge = RIDGE * scale
        eye = torch.eye(size, dtype=torch.float64, device=lhs.device)
        solution = torch.linalg.solve(lhs + ridge * eye, rhs + ridge * mean_t)
    return solution.T.to(dtype).contiguous()
