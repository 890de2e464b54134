"""Fisher merging (Matena & Raffel, arXiv:2111.09832), with MergeBench's settings (arXiv:2505.10833).

Statistic: the diagonal empirical Fisher of each model on its own domain's data,
F_i = (1/n) Σ_s (∂ log p_θi(y_s | x_s) / ∂θ)², one sample per backward pass, so every gradient is a
per-sample gradient (squaring a batch's summed gradient would not give the Fisher). Only gradients are taken:
no optimiser step (MergeBench's collection steps an optimiser while it accumulates, so later samples see moved
weights; that defect is not repeated). ``label`` chooses y_s:
  ``response`` (default, our choice): the sample's own response tokens; log p is the sum of their token
    log-probabilities (the sequence log-likelihood), the empirical Fisher of arXiv:2111.09832 §2 on the data;
    a sample whose response is cut off entirely by ``max_length`` is skipped and not counted in n;
  ``argmax_last``: MergeBench's variant: the model's own argmax token at the last position of
    prompt + response, as one label (arXiv:2505.10833; uiuctml/MergeBench merging code).

Merge: θ = Σ_i w_i F̂_i θ_i / Σ_i w_i F̂_i with F̂_i = max(F_i, ε), ε = 1e-10 as MergeBench; a parameter no
model's data moves therefore gets the weighted mean Σ w_i θ_i / Σ w_i. A tensor some model has no Fisher for
(none was computed: e.g. a tied output layer) is merged as that weighted mean.
"""
from __future__ import annotations

import torch

from mergeplug import MergeplugError
from mergeplug.merging import Merger, TensorInputs, model_label, samples_of, weighted_sum


class FisherMerger(Merger):
    needs_base = False
    statistic = "fisher"
    statistic_parameters = ("samples", "max_length", "label")

    def compute_statistic(self, model, batches, settings) -> dict[str, torch.Tensor]:
        label = settings.get("label", "response")
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}
        used = 0
        for sample in samples_of(batches):  # one backward pass per sample: per-sample gradients
            model.zero_grad(set_to_none=True)
            log_likelihood = sample_log_likelihood(model, sample, label)
            if log_likelihood is None:
                continue
            log_likelihood.backward()
            for name, p in params:
                if p.grad is not None:
                    squares[name].add_(p.grad.float().square())
            used += 1
        model.zero_grad(set_to_none=True)
        if used == 0:
            raise MergeplugError("fisher: no sample has a response token within max_length; raise max_length "
                                 "or use label: argmax_last")
        return {name: s.div_(used) for name, s in squares.items()}

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = inputs.weights("weight")
        total = float(weights.sum())
        if total <= 0:
            raise MergeplugError(f"{inputs.name}: fisher merge needs per-model weights with a positive sum")
        fishers = inputs.statistics
        if not fishers or any(f is None for f in fishers):
            return weighted_sum(inputs.models, weights).div_(total)
        for i, f in enumerate(fishers):
            if f.shape != inputs.models[i].shape:
                raise MergeplugError(f"{inputs.name}: {model_label(inputs, i)}: Fisher of shape {list(f.shape)} for "
                                     f"a weight of shape {list(inputs.models[i].shape)}")
        return fisher_weighted_mean(inputs.models, fishers, weights.tolist(), float(inputs.parameters["epsilon"]))


def fisher_weighted_mean(thetas: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float],
                         epsilon: float) -> torch.Tensor:
    """Σ_i w_i max(F_i, ε) θ_i / Σ_i w_i max(F_i, ε) (arXiv:2111.09832, eq. 3 with a floor)."""
    numerator = torch.zeros_like(thetas[0])
    denominator = torch.zeros_like(thetas[0])
    for theta, fisher, w in zip(thetas, fishers, weights):
        scaled = fisher.clamp_min(epsilon).mul_(w)
        numerator.addcmul_(scaled, theta)
        denominator.add_(scaled)
    return numerator.div_(denominator)


def sample_log_likelihood(model, batch: dict, label: str) -> torch.Tensor | None:
    """log p(y | x) of one sample (see the module docstring), or None when it has no response token left."""
    logits = model(input_ids=batch["input_ids"]).logits[0].float()  # [length, vocab]
    if label == "argmax_last":
        log_probs = torch.log_softmax(logits[-1], dim=-1)
        return log_probs[log_probs.detach().argmax()]
    targets = batch["labels"][0, 1:]  # token t is predicted at position t - 1
    scored = targets != -100
    if not bool(scored.any()):
        return None
    log_probs = torch.log_softmax(logits[:-1][scored], dim=-1)
    return log_probs.gather(-1, targets[scored].unsqueeze(-1)).sum()
