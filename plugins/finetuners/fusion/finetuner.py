"""Pairwise knowledge-fusion finetuning (Wan et al., FuseChat, arXiv:2402.16107, its pairwise fusion; the loss is
FuseLLM's, arXiv:2401.10491).

Every weight of the pivot is trained, on the core's run (:func:`mergeplug.finetuning.finetune_examples`: packing,
Trainer, accelerate, resumption), with

    L = λ · L_LM + (1 − λ) · L_fusion

L_LM is the usual next-token cross-entropy on the gold tokens; L_fusion the cross-entropy of the model's
distribution against the fused target at the same positions: each target is a top-k distribution on pivot ids
(``fusion_ids``, ``fusion_logprobs``, built by :mod:`mergeplug.fusion`), renormalised over its k ids with a
softmax at ``temperature``. Both are sums over the label tokens divided by their count
(:func:`mergeplug.fusion.fusion_loss`). Defaults (parameters.json): λ = 0.9 (``lm_loss_weight``, FuseChat's
released training script and FuseLLM's paper), temperature 1 (FuseChat's ``distill_teacher_temperature``), and
FuseChat's schedule: learning rate 5e-6, 3 epochs, warmup 0.03, cosine, 4 sequences × 4 accumulation steps per
device (its README's pairwise-fusion command). The trained model is saved in the pivot's stored dtype (every finetuner's
default save), so the targets' updates are taken between tensors of one dtype when they are merged.

Examples without fusion targets cannot train this finetuner: run it through ``mergeplug fuse``.
"""
from __future__ import annotations

from typing import Any

from mergeplug.finetuning import Finetuner
from mergeplug.fusion import TARGET_IDS, TARGET_LOGPROBS, fusion_loss


class FusionFinetuner(Finetuner):
    #: Per token: the fused target's pivot ids (-1: padding, no target) and log-probabilities.
    EXTRA_FIELDS = {TARGET_IDS: -1, TARGET_LOGPROBS: 0.0}

    def compute_loss(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
        target_ids = inputs.pop(TARGET_IDS)
        target_logprobs = inputs.pop(TARGET_LOGPROBS)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return fusion_loss(logits, labels, target_ids, target_logprobs,
                           lm_weight=self.parameters["lm_loss_weight"], temperature=self.parameters["temperature"],
                           num_items_in_batch=num_items_in_batch)
