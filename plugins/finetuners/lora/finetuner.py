"""LoRA finetuning (Hu et al., arXiv:2106.09685) with peft.

Every targeted linear layer W (out × in) is frozen and learns an update ΔW = (alpha / r)·B·A with B (out × r)
zero-initialised and A (r × in) random, so training starts from the base model; with use_rslora the scaling is
alpha / sqrt(r) (Kalajdzievski, arXiv:2312.03732). Defaults (parameters.json): r 16, alpha 32, dropout 0.05,
every linear layer of the blocks ("all-linear", as QLoRA arXiv:2305.14314 recommends), learning rate 2e-4
(QLoRA's for 7B-13B models); the rest of the schedule is MergeBench's full-finetuning recipe (arXiv:2505.10833).

The output folder holds the merged full weights (W + ΔW, peft's merge_and_unload), a complete Hugging Face
checkpoint in the dtype the base is stored in (as the ``full`` finetuner saves, so task vectors are taken between
tensors of one dtype), and the adapter itself in ``adapter/`` (float32 factors), whose adapter_config.json names
the base it was trained on: either one is a merge input, and both give the same merge (the engine reads the
adapter over its base; the adapter keeps the update unrounded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeplug import MergeplugError
from mergeplug.finetuning import Finetuner, save_in_base_dtype

#: Sub-folder of the output folder the adapter is saved in.
ADAPTER_FOLDER = "adapter"


class LoraFinetuner(Finetuner):
    """Trains peft LoRA adapters; saves the merged model and the adapter."""

    def lora_config(self):
        """The peft ``LoraConfig`` of this finetuner's parameters (adapter biases off: only B·A is learned)."""
        from peft import LoraConfig

        p = self.parameters
        return LoraConfig(
            r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=p["target_modules"],
            use_rslora=p["use_rslora"], bias="none", task_type="CAUSAL_LM",
        )

    def prepare_model(self, model: Any) -> Any:
        from peft import get_peft_model

        if self.parameters.get("gradient_checkpointing"):
            # Reentrant checkpointing back-propagates only into block inputs that require a gradient; with the
            # embeddings frozen none do, and the adapters inside the blocks would never be trained.
            model.enable_input_require_grads()
        return get_peft_model(model, self.lora_config())

    def save(self, model: Any, tokenizer: Any, folder: Path, *, base: str) -> None:
        """Write the adapter to ``folder/adapter`` (tokenizer included), then merge it into the weights in place
        (``merge_and_unload``: no second copy of the model in memory) and write the merged checkpoint to
        ``folder`` in the base's stored dtype. ``model`` is consumed: its layers hold the merged weights after."""
        if not hasattr(model, "merge_and_unload") or not hasattr(model, "peft_config"):
            raise MergeplugError(f"finetuner 'lora': save() got a {type(model).__name__}, not the peft model "
                                 f"prepare_model() returned; pass that model (unwrapped from DDP/accelerate)")
        folder = Path(folder)
        local = Path(base).expanduser()
        # An absolute folder, so the adapter opens its base from any working directory; a hub id as it is.
        base_ref = str(local.resolve()) if local.is_dir() else base
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_ref
        adapter_folder = folder / ADAPTER_FOLDER
        model.save_pretrained(str(adapter_folder))
        tokenizer.save_pretrained(str(adapter_folder))
        save_in_base_dtype(model.merge_and_unload(), tokenizer, folder, base=base)
