"""The vLLM backend of the model runner (Kwon et al., arXiv:2309.06180): used when vllm is installed and asked for."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_backends(register):
    register(
        "vllm",
        "mergeplug_plugins.backends.vllm.backend:VllmBackend",
        description="vLLM (PagedAttention, continuous batching): fast generation on a CUDA GPU; needs `pip install vllm`.",
        parameters=HERE / "parameters.json",
        reference="arXiv:2309.06180",
    )
