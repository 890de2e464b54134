"""The model-family contract: what is special about an architecture, read from its ``config.json``.

A family plugin registers an instance of a :class:`ModelFamily` subclass with
``register(name, instance, description=..., model_types=[...])``. The core picks the family whose
``model_types`` holds the checkpoint's ``model_type``; an unknown type falls back to :class:`ModelFamily`
itself (the generic family) with a warning. No torch here: families are consulted before any weight is read.
"""
from __future__ import annotations

import re
import warnings
from typing import ClassVar

from .errors import ComponentConflictError, MergeplugError


class ModelFamily:
    """Defaults that fit most decoder-only Hugging Face models (Llama-like names)."""

    #: ``model_type`` values of config.json this family handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Regex whose first group is the transformer block index in a tensor name.
    layer_pattern: ClassVar[str] = r"(?:^|\.)layers\.(\d+)\."
    #: Tensor names of the input embedding and the output head.
    embedding_names: ClassVar[tuple[str, ...]] = ("model.embed_tokens.weight",)
    lm_head_names: ClassVar[tuple[str, ...]] = ("lm_head.weight",)
    #: Whether input and output embeddings are tied when config.json does not say.
    ties_embeddings_by_default: ClassVar[bool] = False
    #: Whether input embeddings are multiplied by sqrt(hidden_size) in the forward pass (Gemma's normaliser).
    scales_embeddings_by_sqrt_hidden: ClassVar[bool] = False
    #: A Jinja chat template for tokenizers that ship none (used only when a run asks for a chat template).
    chat_template: ClassVar[str | None] = None
    #: Known quirks, shown by ``mergeplug show`` and in warnings.
    notes: ClassVar[str] = ""

    name = "generic"

    def text_config(self, config: dict) -> dict:
        """The part of config.json that describes the language model (multimodal configs nest it)."""
        return config.get("text_config") or config

    def num_layers(self, config: dict) -> int | None:
        value = self.text_config(config).get("num_hidden_layers")
        return int(value) if value is not None else None

    def layer_index(self, tensor_name: str) -> int | None:
        match = re.search(self.layer_pattern, tensor_name)
        return int(match.group(1)) if match else None

    def is_embedding(self, tensor_name: str) -> bool:
        return tensor_name in self.embedding_names

    def is_lm_head(self, tensor_name: str) -> bool:
        return tensor_name in self.lm_head_names

    def tied_embeddings(self, config: dict) -> bool:
        tied = config.get("tie_word_embeddings")
        if tied is None:
            tied = self.text_config(config).get("tie_word_embeddings")
        return self.ties_embeddings_by_default if tied is None else bool(tied)

    def vocab_size(self, config: dict) -> int | None:
        value = self.text_config(config).get("vocab_size")
        return int(value) if value is not None else None

    def embedding_scale(self, config: dict) -> float | None:
        """The exact factor the model multiplies its input embeddings by (Gemma: sqrt(hidden_size), which
        transformers casts to the weights' dtype before use); None when the family does not scale them."""
        if not self.scales_embeddings_by_sqrt_hidden:
            return None
        hidden_size = self.text_config(config).get("hidden_size")
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise MergeplugError(
                f"config.json of a {self.name} model has hidden_size {hidden_size!r} (in text_config for multimodal "
                "checkpoints); a positive integer is needed to compute its embedding scale sqrt(hidden_size): "
                "fix or complete config.json"
            )
        return float(hidden_size) ** 0.5


def family_for(config: dict, registry=None, *, source: str = "model") -> ModelFamily:
    """The registered family whose ``model_types`` holds ``config['model_type']``, else the generic one."""
    from .plugins import get_registry

    registry = registry or get_registry()
    model_type = config.get("model_type")
    claims = [c for c in registry.components("family") if model_type in c.extra.get("model_types", ())]
    if len(claims) > 1:
        who = " and ".join(f"{c.name} from {c.distribution} {c.version} (plugin {c.plugin})" for c in claims)
        raise ComponentConflictError(
            f"{source}: model_type {model_type!r} is claimed by families {who}; disable one with "
            f"MERGEPLUG_DISABLE={claims[-1].plugin}"
        )
    if claims:
        problem = registry.conflict(claims[0])
        if problem:
            raise ComponentConflictError(problem)
        return claims[0].load()
    warnings.warn(
        f"{source}: no model family plugin knows model_type {model_type!r}; using the generic family "
        f"(layer index from '.layers.N.', embeddings {ModelFamily.embedding_names[0]})",
        stacklevel=2,
    )
    return ModelFamily()
