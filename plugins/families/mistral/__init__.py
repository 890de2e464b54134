"""Mistral family: Mistral 7B (arXiv:2310.06825) and later dense Mistral models (``model_type: mistral``).

Tensor names are those of ``MistralForCausalLM`` checkpoints (checked against transformers 5.24 in
tests/families): the Llama layout, blocks under ``model.layers.N.``, ``model.embed_tokens.weight`` and
``lm_head.weight``.
"""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class MistralFamily(ModelFamily):
    """Dense Mistral decoders (``model_type: mistral``)."""

    name = "mistral"
    model_types = ("mistral",)
    layer_pattern = r"(?:^|\.)layers\.(\d+)\."
    embedding_names = ("model.embed_tokens.weight",)
    lm_head_names = ("lm_head.weight",)
    # transformers' MistralConfig defaults tie_word_embeddings to False, as every Mistral release ships.
    ties_embeddings_by_default = False
    notes = (
        "Mistral 7B v0.1 uses sliding-window attention (sliding_window: 4096); v0.2 and later set it to null. "
        "Some releases (Mistral NeMo) set head_dim apart from hidden_size / num_attention_heads. Mixtral "
        "(model_type 'mixtral') and the multimodal Mistral 3 ('mistral3') are other families."
    )


FAMILY = MistralFamily()


@hookimpl
def register_families(register):
    register(
        FAMILY.name,
        FAMILY,
        description="Dense Mistral decoders: Llama tensor layout, untied embeddings.",
        model_types=list(FAMILY.model_types),
        reference="arXiv:2310.06825",
    )
