"""Qwen2 family: Qwen2 (arXiv:2407.10671), Qwen2.5 (arXiv:2412.15115) and the Qwen2-MoE models.

Tensor names are those of ``Qwen2ForCausalLM`` and ``Qwen2MoeForCausalLM`` checkpoints (checked against
transformers 5.24 in tests/families): blocks under ``model.layers.N.``, ``model.embed_tokens.weight`` and
``lm_head.weight`` (absent when tied). Qwen2-MoE keeps the same names around its experts, which files store one
tensor per expert (``model.layers.N.mlp.experts.E.down_proj.weight``), so it is handled here too.
"""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class Qwen2Family(ModelFamily):
    """Qwen2 / Qwen2.5 dense decoders and Qwen2-MoE (``model_type: qwen2``, ``qwen2_moe``)."""

    name = "qwen2"
    model_types = ("qwen2", "qwen2_moe")
    layer_pattern = r"(?:^|\.)layers\.(\d+)\."
    embedding_names = ("model.embed_tokens.weight",)
    lm_head_names = ("lm_head.weight",)
    # transformers' Qwen2Config defaults tie_word_embeddings to False; the small models (0.5B-3B) set it to
    # true in their config.json, which tied_embeddings() reads first.
    ties_embeddings_by_default = False
    notes = (
        "Small Qwen2/Qwen2.5 models (0.5B, 1.5B, 3B) tie embeddings per config.json; 7B and larger do not. "
        "q/k/v projections carry biases (model.layers.N.self_attn.{q,k,v}_proj.bias), merged like the weights. "
        "The embedding matrix (151936 rows in the released models) is padded beyond the tokenizer's vocabulary. "
        "qwen2_moe: each expert is its own tensor on disk (transformers 5 fuses them only in memory), so an "
        "element-wise merge pairs expert E with expert E; that is right for finetunes of one base and wrong "
        "for independently upcycled models. The router (mlp.gate) and shared_expert_gate are merged like "
        "any block tensor."
    )


FAMILY = Qwen2Family()


@hookimpl
def register_families(register):
    register(
        FAMILY.name,
        FAMILY,
        description="Qwen2 / Qwen2.5 decoders and Qwen2-MoE: attention biases, small models tie embeddings.",
        model_types=list(FAMILY.model_types),
        reference="arXiv:2407.10671",
    )
