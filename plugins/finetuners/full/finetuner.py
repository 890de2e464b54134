"""Full finetuning: every weight of the base is trained, as MergeBench trains its specialists (arXiv:2505.10833).

The run (data, packing, Trainer, resume, output) is the core's, :func:`mergeplug.finetuning.finetune`; this
plugin trains the model as loaded and saves it in the dtype the base is stored in (bf16 for MergeBench's
bases), so a specialist's task vector is taken between tensors of one dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeplug.finetuning import Finetuner, save_in_base_dtype


class FullFinetuner(Finetuner):
    def save(self, model: Any, tokenizer: Any, folder: Path, *, base: str) -> None:
        save_in_base_dtype(model, tokenizer, folder, base=base)
