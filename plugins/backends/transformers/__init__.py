"""The transformers backend of the model runner: batched generation and log-likelihood scoring in-process."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_backends(register):
    register(
        "transformers",
        "mergeplug_plugins.backends.transformers.backend:TransformersBackend",
        description="Hugging Face transformers: length-sorted batches, left padding, KV cache, stop sequences.",
        parameters=HERE / "parameters.json",
        reference="https://github.com/huggingface/transformers",
    )
