"""Llama family: LLaMA (arXiv:2302.13971), Llama 2 (arXiv:2307.09288), Llama 3 / 3.1 / 3.2 (arXiv:2407.21783).

Tensor names are those of ``LlamaForCausalLM`` checkpoints (checked against transformers 5.24 in
tests/families): blocks under ``model.layers.N.``, the input embedding ``model.embed_tokens.weight``, the output
head ``lm_head.weight`` (absent from the file when the embeddings are tied).
"""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class LlamaFamily(ModelFamily):
    """Llama-architecture decoders (``model_type: llama``)."""

    name = "llama"
    model_types = ("llama",)
    layer_pattern = r"(?:^|\.)layers\.(\d+)\."
    embedding_names = ("model.embed_tokens.weight",)
    lm_head_names = ("lm_head.weight",)
    # transformers' LlamaConfig defaults tie_word_embeddings to False; a checkpoint that ties says so.
    ties_embeddings_by_default = False
    # Our own template in the Llama 3 turn format (header tokens, <|eot_id|> after each turn; arXiv:2407.21783),
    # used only when a run asks for a chat template and the tokenizer ships none. Llama 1/2 tokenizers lack these
    # special tokens: give such a model its own template string instead.
    chat_template = (
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    notes = (
        "Llama 3.2 1B/3B tie input and output embeddings (tie_word_embeddings: true, no lm_head.weight in the "
        "file); Llama 3.1 8B and Llama 2 do not. Llama 3 has a 128256-token vocabulary, and some MergeBench "
        "specialists carry more embedding rows than their base (128320), so embeddings and lm_head need a "
        "vocabulary-aware rule. Llama 3.1+ use rope_scaling type 'llama3'. Many Llama-architecture derivatives "
        "reuse model_type 'llama'."
    )


FAMILY = LlamaFamily()


@hookimpl
def register_families(register):
    register(
        FAMILY.name,
        FAMILY,
        description="Llama 1/2/3 decoders: untied embeddings unless config.json ties them (Llama 3.2 1B/3B).",
        model_types=list(FAMILY.model_types),
        reference="arXiv:2407.21783",
    )
