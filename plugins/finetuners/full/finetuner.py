"""Full finetuning: every weight of the base is trained, as MergeBench trains its specialists (arXiv:2505.10833).

The run (data, packing, Trainer, resume, output) is the core's, :func:`mergeplug.finetuning.finetune`; this
plugin trains the model as loaded and saves it as every finetuner does by default, in the dtype the base is
stored in (bf16 for MergeBench's bases), so a specialist's task vector is taken between tensors of one dtype.
"""
from __future__ import annotations

from mergeplug.finetuning import Finetuner


class FullFinetuner(Finetuner):
    """Every weight trained; the core's run and the default save do the rest."""
