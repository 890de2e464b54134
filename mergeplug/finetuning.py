"""The finetuner contract, and the supervised finetuning run every finetuner plugin shares.

A finetuner plugin (kind ``finetuner``) registers a subclass of :class:`Finetuner`. The core owns the run:
it loads the base model and tokenizer, builds the training set from the domains' training data (the domain's
prompt format, loss on response tokens only, optional packing), trains with transformers' Trainer (accelerate
underneath, so the same command runs under ``accelerate launch`` or ``torchrun``), logs the loss, resumes from
the last checkpoint, and writes the output folder atomically. The plugin decides only what is trained and
how the result is saved: ``full`` trains every weight; ``lora`` wraps the model with peft adapters and saves
the adapter beside the merged full weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar


class Finetuner:
    """Base class of finetuner plugins.

    Constructed with the finetuner's parameters (its ``parameters.json``, defaults filled in): the training
    hyper-parameters the core reads (:attr:`TRAINING_PARAMETERS`) and the plugin's own.
    """

    #: Parameters the core's training run reads (learning_rate, epochs...); the rest are the plugin's own.
    TRAINING_PARAMETERS: ClassVar[tuple[str, ...]] = (
        "learning_rate", "epochs", "max_steps", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
        "per_device_batch_size", "gradient_accumulation_steps", "max_seq_length", "packing",
        "gradient_checkpointing", "bf16", "save_steps", "logging_steps", "seed",
    )

    def __init__(self, **parameters: Any):
        self.parameters = parameters

    def prepare_model(self, model: Any) -> Any:
        """The model to train (called once the base is loaded): ``model`` itself, or a wrapper (peft)."""
        return model

    def save(self, model: Any, tokenizer: Any, folder: Path, *, base: str) -> None:
        """Write the trained model into ``folder`` (a staging folder the core renames into place): a complete
        Hugging Face checkpoint (config, weights, tokenizer) that ``AutoModelForCausalLM`` loads."""
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
