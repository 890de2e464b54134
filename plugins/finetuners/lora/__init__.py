"""LoRA finetuning (Hu et al., arXiv:2106.09685) with peft: low-rank adapters on the linear layers, saved as
the adapter and as the merged full weights."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_finetuners(register):
    register(
        "lora",
        "mergeplug_plugins.finetuners.lora.finetuner:LoraFinetuner",
        description="LoRA adapters (peft) on the attention and MLP projections; writes the merged model and the adapter.",
        reference="arXiv:2106.09685",
        parameters=HERE / "parameters.json",
    )
