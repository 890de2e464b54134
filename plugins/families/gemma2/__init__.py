"""Gemma 2 family (arXiv:2408.00118), ``model_type: gemma2``; MergeBench's gemma-2-2b and gemma-2-9b bases.

Tensor names are those of ``Gemma2ForCausalLM`` checkpoints (checked against transformers 5.24 in
tests/families): blocks under ``model.layers.N.`` (four norms each: input, post_attention, pre_feedforward,
post_feedforward), the embedding ``model.embed_tokens.weight``, and no ``lm_head.weight`` (tied).
"""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class Gemma2Family(ModelFamily):
    """Gemma 2 decoders (2B, 9B, 27B)."""

    name = "gemma2"
    model_types = ("gemma2",)
    layer_pattern = r"(?:^|\.)layers\.(\d+)\."
    embedding_names = ("model.embed_tokens.weight",)
    # Only present in a checkpoint saved with tie_word_embeddings: false.
    lm_head_names = ("lm_head.weight",)
    # Gemma 2 ties input and output embeddings (arXiv:2408.00118; Gemma2Config's default).
    ties_embeddings_by_default = True
    # Input embeddings are multiplied by sqrt(hidden_size) (transformers' Gemma models; the papers' normaliser).
    scales_embeddings_by_sqrt_hidden = True
    notes = (
        "Soft-capping: attention logits are capped by 50 * tanh(x / 50) and final logits by 30 * tanh(x / 30) "
        "(attn_logit_softcapping, final_logit_softcapping), so transformers 5.24 offers no SDPA for Gemma 2 "
        "(eager or flash attention) and log-likelihoods are of capped logits. Layers alternate local "
        "sliding-window (4096) and global attention; attention is scaled by query_pre_attn_scalar^-0.5. "
        "Input embeddings are multiplied by sqrt(hidden_size) (embedding_scale), cast to the weights' dtype; "
        "embeddings are tied. RMSNorm scales by (1 + weight): norm weights are stored centred on 0, so a "
        "combination whose weights do not sum to 1 scales them differently than on Llama; task vectors are "
        "unaffected. Prompts must start with <bos>."
    )



FAMILY = Gemma2Family()


@hookimpl
def register_families(register):
    register(
        FAMILY.name,
        FAMILY,
        description="Gemma 2 decoders: logit soft-capping, tied embeddings scaled by sqrt(hidden_size).",
        model_types=list(FAMILY.model_types),
        reference="arXiv:2408.00118",
    )
