"""Localize-and-Stitch with trained masks (He et al., arXiv:2408.13656: localization with data), with
MergeBench's settings as defaults (arXiv:2505.10833).

Localize, for each model i on the first ``samples`` rows of its own domain (the engine's statistics pass,
``statistic_needs_base``: it also reads the base model):

    τ_i = θ_i − θ_base over the masked tensors (every tensor but the embeddings and output layer, with
          ``vocabulary: base``; those are held at θ_base while training and stay at θ_base in the merge)
    S_i = +b where |τ_i| is in the top ``sparsity`` fraction over all masked entries of the model (ties at the
          cut all kept, as MergeBench's ``>=``), −b elsewhere; b = ``sigmoid_bias``
    ``epochs`` times, one full-batch step per pass over the samples (the paper's code):
        θ = θ_base + σ(S_i) ⊙ τ_i
        g = Σ_s ∇_θ L_s(θ)  (``gradient_reduction: sum``) or its mean over the samples (``mean``), L_s the mean
            token cross-entropy of sample s's response tokens (a sample cut to no response token is skipped)
        S_i ← S_i − σ'(S_i) ⊙ (lr · g ⊙ τ_i + λ)          λ = ``l1_strength``, lr = ``learning_rate``
    m_i = round(σ(S_i)) = [S_i > 0]   (the paper's code rounds σ(S); σ = 0.5 rounds to 0)

    g ⊙ τ_i ⊙ σ'(S_i) is ∂L/∂S_i by the chain rule through θ = θ_base + σ(S_i) ⊙ τ_i, so each step is gradient
    descent on the paper's objective L(θ_base + σ(S) ⊙ τ_i) + (λ / lr) · ||σ(S)||_1: the L1 term is not
    normalised by the parameter count, and λ's step is not scaled by lr, both as the official code
    (uiuctml/Localize-and-Stitch, ``localize_utils.py``). That code adds its regulariser with the sign of S
    (``S += λ·sign(S)·σ'(S)``), which pushes logits away from 0 instead of shrinking the mask; we take the
    descent step of the paper's L1 term, so λ > 0 switches off entries the loss does not need. MergeBench's
    version also steps an AdamW optimiser on the model while it collects the gradients (later batches see
    moved weights) and sums bfloat16 gradients over batches of two samples; we take exact float32 gradients
    at the interpolated weights (a batch's backward pass of its samples' summed losses: the sum of the
    per-sample gradients), so its learning rate with ``sum`` gives about twice its step on data of
    equal-length samples.

Stitch:  θ = θ_base + Σ_i m_i ⊙ τ_i / Σ_i m_i   where Σ_i m_i > 0, θ_base elsewhere

    Overlaps are averaged over the number of masks covering each position (the paper's stitching step);
    MergeBench divides overlaps by 2 whatever their count, which we do not copy. A tensor no model has a mask
    for (the embeddings and output layer with ``vocabulary: base``) stays at θ_base. No scaling coefficient.

Memory of the statistics pass, float32 on the merge device: the model (its weights become the interpolated
θ), its gradients, S_i and τ_i for every masked parameter (4 × 4 bytes per parameter: an 8B model needs about
128 GB), plus one base tensor at a time (re-read from the base checkpoint each epoch, not held). Each mask is
stored as a bool tensor (1 byte per entry) in the statistics cache. No random numbers are drawn: the same
data and settings give the same mask (on a GPU, up to the backward pass's nondeterministic float sums).
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import torch

from mergeplug import MergeplugError
from mergeplug.merging import (
    GlobalMagnitudeThreshold,
    Merger,
    TensorInputs,
    elementwise_in_chunks,
    model_label,
    task_vector,
)


class TrainedLocalizeAndStitch(Merger):
    needs_base = True
    statistic = "localize_stitch_mask"
    statistic_needs_base = True
    statistic_parameters = ("samples", "max_length", "sparsity", "sigmoid_bias", "learning_rate", "epochs",
                            "l1_strength", "gradient_reduction", "vocabulary")
    statistic_shape = "weight"

    def compute_statistic(self, model, batches, settings, base: Mapping[str, torch.Tensor] | None = None):
        if base is None:
            raise MergeplugError("localize_stitch_trained: the statistics pass gave no base model weights; "
                                 "the recipe needs a base_model")
        return train_masks(model, list(batches), base, {**self.parameters, **settings})

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        if inputs.base is None:
            task_vector(inputs, 0)  # raises the missing-base error
        masks = list(inputs.statistics) or [None] * len(inputs.models)
        for i, mask in enumerate(masks):
            if mask is not None and mask.shape != inputs.models[i].shape:
                raise MergeplugError(f"{inputs.name}: {model_label(inputs, i)}: mask of shape {list(mask.shape)} for "
                                     f"a weight of shape {list(inputs.models[i].shape)}")
        present = [i for i, mask in enumerate(masks) if mask is not None]
        if not present:
            return inputs.base.clone()
        return stitch(inputs.base, [inputs.models[i] for i in present], [masks[i] for i in present])


def stitch(base: torch.Tensor, models: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """θ_base + Σ_i m_i ⊙ (θ_i − θ_base) / Σ_i m_i where some mask covers a position, θ_base elsewhere
    (arXiv:2408.13656, the stitching step), a cache-sized chunk at a time; masks are 0/1 in the models' dtype."""
    n = len(models)

    def step(part: list[torch.Tensor]) -> torch.Tensor:
        chunk_base, chunk_models, chunk_masks = part[0], part[1:n + 1], part[n + 1:]
        stitched, coverage = torch.zeros_like(chunk_base), torch.zeros_like(chunk_base)
        for model, mask in zip(chunk_models, chunk_masks):
            stitched.addcmul_(model - chunk_base, mask)
            coverage.add_(mask)
        # stitched is zero where no mask covers a position, so clamping the count only avoids 0/0.
        return chunk_base + stitched.div_(coverage.clamp_min_(1))

    return elementwise_in_chunks(step, [base, *models, *[m.to(base.dtype) for m in masks]])


# --- localization ------------------------------------------------------------------------------------------
def vocabulary_parameters(model) -> set[str]:
    """Names of the model's input-embedding and output-layer parameters (a tied output layer is the
    embedding matrix, listed once by ``named_parameters``)."""
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            modules.append(module)
    ids = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def initial_logits(task_vectors: Mapping[str, torch.Tensor], sparsity: float, bias: float) -> dict[str, torch.Tensor]:
    """+bias where |τ| is in the top ``sparsity`` fraction over all the task vectors together, −bias
    elsewhere (the paper's code's initialisation, arXiv:2408.13656; ties at the cut all kept, as MergeBench).

    The cut is exact: a histogram pass finds the bin of the k-th largest magnitude (k = round(sparsity·n)) and
    a second pass ranks that bin's entries (:class:`~mergeplug.merging.GlobalMagnitudeThreshold`)."""
    threshold = GlobalMagnitudeThreshold(sparsity)
    for tv in task_vectors.values():
        threshold.add(tv)
    threshold.locate()
    for tv in task_vectors.values():
        threshold.add_exact(tv)
    cut = threshold.threshold()
    return {name: torch.where(tv.abs() >= cut, bias, -bias).to(torch.float32) for name, tv in task_vectors.items()}


def logits_step(logits: torch.Tensor, task_vector_: torch.Tensor, weight_gradient: torch.Tensor,
                learning_rate: float, l1_strength: float) -> torch.Tensor:
    """One step on the mask logits S, in place: S ← S − σ'(S) ⊙ (lr · ∂L/∂θ ⊙ τ + λ), with σ'(S) taken before the
    step (arXiv:2408.13656; the official code's update with the L1 term's descent sign, see the module)."""
    probability = torch.sigmoid(logits)
    derivative = probability.mul_(1.0 - probability)  # σ'(S) = σ(S)(1 − σ(S))
    update = weight_gradient * task_vector_
    update.mul_(learning_rate).add_(l1_strength).mul_(derivative)
    return logits.sub_(update)


def response_loss(model, batch: dict) -> tuple[torch.Tensor, int] | None:
    """Σ over the batch's samples of each one's mean token cross-entropy on its response tokens (labels !=
    -100; padding is -100 too), samples with no response token left out, and how many samples count; None
    when no sample has one. Its gradient is the sum of the per-sample gradients, so batching does not change
    it."""
    targets = batch["labels"][:, 1:]  # token t is predicted at position t - 1
    scored = targets != -100
    counts = scored.sum(dim=1)
    if not bool(counts.any()):
        return None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1].float()
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    per_sample = (per_token * scored).sum(dim=1) / counts.clamp_min(1)
    return per_sample[counts > 0].sum(), int((counts > 0).sum())


def train_masks(model, batches: list[dict], base: Mapping[str, torch.Tensor], settings: Mapping[str, Any],
                progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Each masked parameter's binary mask (bool, its shape) for ``model`` (θ_i) against ``base`` (see the
    module docstring). The model's weights are left at the last interpolation, θ_base + σ(S) ⊙ τ."""
    vocabulary = vocabulary_parameters(model) if settings.get("vocabulary", "base") == "base" else set()
    named = dict(model.named_parameters())
    masked = [name for name in named if name not in vocabulary]
    if not masked:
        raise MergeplugError("localize_stitch_trained: the model has no parameter to mask")
    task_vectors = {}
    with torch.no_grad():
        for name in masked:
            theta = named[name]
            base_value = _base_tensor(base, name, theta, settings)
            task_vectors[name] = theta.detach().float() - base_value
        for name in vocabulary:  # held at the base's values, as in the merged model
            _hold_at_base(named[name], base, name)
    for name, p in named.items():
        p.requires_grad_(name not in vocabulary)  # gradients only where a mask is trained

    logits = initial_logits(task_vectors, float(settings["sparsity"]), float(settings["sigmoid_bias"]))
    epochs, learning_rate = int(settings["epochs"]), float(settings["learning_rate"])
    l1_strength, mean = float(settings["l1_strength"]), settings.get("gradient_reduction", "sum") == "mean"
    with _progress_bar(epochs * len(batches), progress) as bar:
        for _ in range(epochs):
            with torch.no_grad():
                for name in masked:
                    named[name].copy_(torch.addcmul(base[name], torch.sigmoid(logits[name]), task_vectors[name]))
            model.zero_grad(set_to_none=True)
            used = 0
            for batch in batches:
                scored = response_loss(model, batch)
                if scored is not None:
                    scored[0].backward()
                    used += scored[1]
                bar.update(1)
            if used == 0:
                raise MergeplugError("localize_stitch_trained: no sample has a response token within max_length; "
                                     "raise max_length")
            with torch.no_grad():
                for name in masked:
                    gradient = named[name].grad
                    if gradient is None:  # a parameter the loss does not reach: only the L1 term moves it
                        gradient = torch.zeros_like(task_vectors[name])
                    elif mean:
                        gradient = gradient.div_(used)
                    logits_step(logits[name], task_vectors[name], gradient, learning_rate, l1_strength)
            model.zero_grad(set_to_none=True)
    return {name: s > 0 for name, s in logits.items()}


def _base_tensor(base: Mapping[str, torch.Tensor], name: str, theta: torch.Tensor, settings) -> torch.Tensor:
    where = getattr(base, "where", "base_model")
    if name not in base:
        raise MergeplugError(f"localize_stitch_trained: {where} has no tensor {name}, which the model has; the "
                             f"task vector needs both")
    value = base[name]
    if value.shape != theta.shape:
        hint = " (or keep vocabulary: base)" if settings.get("vocabulary") == "masked" else ""
        raise MergeplugError(f"localize_stitch_trained: {name} has shape {list(theta.shape)} in the model and "
                             f"{list(value.shape)} in {where}; a task vector needs equal shapes{hint}")
    return value


def _hold_at_base(parameter: torch.Tensor, base: Mapping[str, torch.Tensor], name: str) -> None:
    """Set a vocabulary parameter to the base's values on the rows both have (a model with more rows keeps its
    own extra rows, as the merge does when its tokenizer is the output's)."""
    if name not in base:
        return
    value = base[name]
    rows = min(value.shape[0], parameter.shape[0])
    if value.shape[1:] != parameter.shape[1:]:
        raise MergeplugError(f"localize_stitch_trained: {name} has shape {list(parameter.shape)} in the model and "
                             f"{list(value.shape)} in {getattr(base, 'where', 'base_model')}")
    parameter[:rows].copy_(value[:rows])


def _progress_bar(total: int, progress: bool | None):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc="localize_stitch_trained: train mask", unit="sample", disable=disable, leave=False)

