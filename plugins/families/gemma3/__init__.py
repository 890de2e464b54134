"""Gemma 3 family (arXiv:2503.19786): text-only ``gemma3_text`` and multimodal ``gemma3`` checkpoints.

Tensor names, checked against transformers 5.24 in tests/families:
  * ``Gemma3ForCausalLM`` (gemma3_text, e.g. gemma-3-1b) saves the Llama layout: ``model.layers.N.``,
    ``model.embed_tokens.weight``, ``lm_head.weight`` only when untied.
  * ``Gemma3ForConditionalGeneration`` (gemma3) saves the language model under ``language_model.``:
    ``language_model.model.layers.N.``, ``language_model.model.embed_tokens.weight``,
    ``language_model.lm_head.weight`` only when untied; beside it ``vision_tower.`` (SigLIP, with its own
    ``encoder.layers.N.``) and ``multi_modal_projector.``. In memory transformers 5 names the same tensors
    ``model.language_model.*``, ``model.vision_tower.*`` and ``lm_head.weight``; a file written from a raw
    state dict carries those names, so they are recognised too.
The layer pattern is anchored to the language model so that vision-tower blocks get no layer index: their
depth is not the text model's, and per-layer schedules are defined over the text blocks.
"""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class Gemma3Family(ModelFamily):
    """Gemma 3 decoders, text-only (1B) and multimodal (4B, 12B, 27B)."""

    name = "gemma3"
    model_types = ("gemma3", "gemma3_text")
    layer_pattern = r"^(?:model\.|language_model\.model\.|model\.language_model\.)layers\.(\d+)\."
    embedding_names = (
        "model.embed_tokens.weight",
        "language_model.model.embed_tokens.weight",
        "model.language_model.embed_tokens.weight",
    )
    # Only present in a checkpoint saved with tie_word_embeddings: false.
    lm_head_names = ("lm_head.weight", "language_model.lm_head.weight")
    # Gemma 3 ties input and output embeddings (arXiv:2503.19786; Gemma3Config's and Gemma3TextConfig's default).
    ties_embeddings_by_default = True
    # Input embeddings are multiplied by sqrt(hidden_size) (transformers' Gemma models; the papers' normaliser).
    scales_embeddings_by_sqrt_hidden = True
    notes = (
        "No soft-capping (Gemma 2's is replaced by QK-norm: self_attn.q_norm / k_norm in every block). Five "
        "local sliding-window layers per global one, with separate RoPE bases. Multimodal checkpoints "
        "(model_type gemma3) nest the language model's settings in text_config and prefix its tensors with "
        "'language_model.'; vision_tower.* and multi_modal_projector.* tensors lie outside the text blocks "
        "(no layer index) and are merged like any other non-block tensor. Input embeddings are multiplied by "
        "sqrt(hidden_size) of text_config (embedding_scale), cast to the weights' dtype; embeddings are tied. "
        "RMSNorm scales by (1 + weight): norm weights are stored centred on 0, so a combination whose weights "
        "do not sum to 1 scales them differently than on Llama; task vectors are unaffected. Prompts must "
        "start with <bos>."
    )



FAMILY = Gemma3Family()


@hookimpl
def register_families(register):
    register(
        FAMILY.name,
        FAMILY,
        description="Gemma 3, text and multimodal (language_model.*): tied embeddings scaled by sqrt(hidden_size).",
        model_types=list(FAMILY.model_types),
        reference="arXiv:2503.19786",
    )
