"""Gemma family: Gemma 1 (arXiv:2403.08295), ``model_type: gemma``.

Tensor names are those of ``GemmaForCausalLM`` checkpoints (checked against transformers 5.24 in
tests/families): blocks under ``model.layers.N.``, the embedding ``model.embed_tokens.weight``, and no
``lm_head.weight`` in the file because Gemma ties its output head to the input embedding.
"""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class GemmaFamily(ModelFamily):
    """Gemma 1 decoders (2B, 7B, CodeGemma)."""

    name = "gemma"
    model_types = ("gemma",)
    layer_pattern = r"(?:^|\.)layers\.(\d+)\."
    embedding_names = ("model.embed_tokens.weight",)
    # Only present in a checkpoint saved with tie_word_embeddings: false.
    lm_head_names = ("lm_head.weight",)
    # Gemma ties input and output embeddings (arXiv:2403.08295; GemmaConfig's default).
    ties_embeddings_by_default = True
    # Input embeddings are multiplied by sqrt(hidden_size) (transformers' Gemma models; the papers' normaliser).
    scales_embeddings_by_sqrt_hidden = True
    # Our own template in Gemma's turn format (<start_of_turn>user / model ... <end_of_turn>; arXiv:2403.08295),
    # used only when a run asks for a chat template and the tokenizer ships none. Gemma has no system role: a
    # system message is rendered as a user turn (our choice).
    chat_template = (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = 'user' %}{% endif %}"
        "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    notes = (
        "Input embeddings are multiplied by sqrt(hidden_size) (embedding_scale), a factor cast to the weights' "
        "dtype: in bf16 sqrt(3072) = 55.43 becomes 55.5. Input and output embeddings are tied. RMSNorm scales "
        "by (1 + weight), so norm weights are stored centred on 0: a combination whose weights do not sum to "
        "1 (linear with normalize: false) scales norms differently than on Llama; task vectors are unaffected. "
        "gemma-7b has head_dim 256 while hidden_size / num_attention_heads is 192. Prompts must start with <bos>."
    )



FAMILY = GemmaFamily()


@hookimpl
def register_families(register):
    register(
        FAMILY.name,
        FAMILY,
        description="Gemma 1 decoders: tied embeddings scaled by sqrt(hidden_size), (1 + w) RMSNorm.",
        model_types=list(FAMILY.model_types),
        reference="arXiv:2403.08295",
    )
