"""Model-family plugins against real checkpoints written by transformers (tiny configs: hidden 16, 2 layers, vocab 64).

Each architecture is built, saved with ``save_pretrained`` and its safetensors keys read back; every key's
layer index, the embedding name and the output head (or its absence when tied) are checked against the
family that ``family_for`` picks through the real plugin registry.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from mergeplug import MergeplugError
from mergeplug.families import ModelFamily, family_for
from mergeplug.plugins import Registry

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64, head_dim=8)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)
MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8)
# Special-token ids must fall inside the tiny vocabulary.
GEMMA3_IMAGE_TOKENS = dict(mm_tokens_per_image=4, image_token_index=63, boi_token_index=61, eoi_token_index=62)

FAMILY_NAMES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3"]


@dataclass
class Case:
    """One architecture as transformers saves it, and the names a family must find in it."""

    family: str
    build: callable  # () -> the model
    block_prefix: str  # text blocks are ``{block_prefix}{N}.``
    embedding: str
    lm_head: str | None  # None: tied, so absent from the file
    final_norm: str = "model.norm.weight"
    # Prefixes of tensors outside the text model (vision tower, projector): no layer index.
    other_prefixes: tuple[str, ...] = field(default_factory=tuple)


def causal_lm(model_cls, config_cls, **overrides):
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**TEXT, **overrides}))


def gemma3_multimodal(tied: bool):
    def build():
        config = transformers.Gemma3Config(
            text_config={**TEXT, "tie_word_embeddings": tied}, vision_config=VISION, tie_word_embeddings=tied,
            **GEMMA3_IMAGE_TOKENS,
        )
        return transformers.Gemma3ForConditionalGeneration(config)
    return build


MM = dict(block_prefix="language_model.model.layers.", embedding="language_model.model.embed_tokens.weight",
          final_norm="language_model.model.norm.weight", other_prefixes=("vision_tower.", "multi_modal_projector."))
TXT = dict(block_prefix="model.layers.", embedding="model.embed_tokens.weight")

CASES = {
    "llama": Case("llama", causal_lm("LlamaForCausalLM", "LlamaConfig"), lm_head="lm_head.weight", **TXT),
    # Llama 3.2 1B/3B style.
    "llama-tied": Case("llama", causal_lm("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True), lm_head=None,
                       **TXT),
    "mistral": Case("mistral", causal_lm("MistralForCausalLM", "MistralConfig"), lm_head="lm_head.weight", **TXT),
    "qwen2": Case("qwen2", causal_lm("Qwen2ForCausalLM", "Qwen2Config"), lm_head="lm_head.weight", **TXT),
    # Qwen2/2.5 0.5B-3B style.
    "qwen2-tied": Case("qwen2", causal_lm("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=True), lm_head=None,
                       **TXT),
    "qwen2_moe": Case("qwen2", causal_lm("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **MOE), lm_head="lm_head.weight",
                      **TXT),
    "gemma": Case("gemma", causal_lm("GemmaForCausalLM", "GemmaConfig"), lm_head=None, **TXT),
    "gemma2": Case("gemma2", causal_lm("Gemma2ForCausalLM", "Gemma2Config"), lm_head=None, **TXT),
    "gemma2-untied": Case("gemma2", causal_lm("Gemma2ForCausalLM", "Gemma2Config", tie_word_embeddings=False),
                          lm_head="lm_head.weight", **TXT),
    "gemma3_text": Case("gemma3", causal_lm("Gemma3ForCausalLM", "Gemma3TextConfig"), lm_head=None, **TXT),
    "gemma3": Case("gemma3", gemma3_multimodal(tied=True), lm_head=None, **MM),
    "gemma3-untied": Case("gemma3", gemma3_multimodal(tied=False), lm_head="language_model.lm_head.weight", **MM),
}


@pytest.fixture(scope="module")
def registry():
    return Registry()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, config.json, sorted safetensors keys) per case, each built once on first use."""
    cache = {}

    def get(case_id):
        if case_id not in cache:
            torch.manual_seed(0)
            model = CASES[case_id].build()
            folder = tmp_path_factory.mktemp(case_id)
            model.save_pretrained(folder)
            config = json.loads((folder / "config.json").read_text())
            files = sorted(Path(folder).glob("*.safetensors"))
            keys = []
            for file in files:
                with safe_open(str(file), "pt") as f:
                    keys += list(f.keys())
            cache[case_id] = (model, config, sorted(keys))
        return cache[case_id]

    return get


def expected_layer(case: Case, key: str) -> int | None:
    if not key.startswith(case.block_prefix):
        return None
    return int(key[len(case.block_prefix):].split(".", 1)[0])


@pytest.mark.parametrize("case_id", list(CASES))
def test_names_in_a_saved_checkpoint(case_id, saved, registry):
    case = CASES[case_id]
    _, config, keys = saved(case_id)
    family = family_for(config, registry)
    assert family.name == case.family
    assert isinstance(family, ModelFamily) and type(family) is not ModelFamily

    assert [k for k in keys if family.is_embedding(k)] == [case.embedding]
    assert [k for k in keys if family.is_lm_head(k)] == ([case.lm_head] if case.lm_head else [])
    assert family.tied_embeddings(config) is (case.lm_head is None)

    layers = {k: family.layer_index(k) for k in keys}
    assert layers == {k: expected_layer(case, k) for k in keys}
    assert sorted(set(v for v in layers.values() if v is not None)) == [0, 1]
    # Both blocks hold the same tensors, so no block tensor was missed by the pattern.
    per_layer = [sorted(k.replace(f"{case.block_prefix}{i}.", "") for k, v in layers.items() if v == i) for i in (0, 1)]
    assert per_layer[0] == per_layer[1] and len(per_layer[0]) >= 9
    outside = {k for k, v in layers.items() if v is None}
    expected_outside = {case.embedding, case.final_norm} | ({case.lm_head} if case.lm_head else set())
    expected_outside |= {k for k in keys if k.startswith(case.other_prefixes)} if case.other_prefixes else set()
    assert outside == expected_outside

    assert family.num_layers(config) == 2
    assert family.vocab_size(config) == 64


def test_multimodal_gemma3_vision_blocks_get_no_layer_index(saved, registry):
    _, config, keys = saved("gemma3")
    family = family_for(config, registry)
    vision_blocks = [k for k in keys if k.startswith("vision_tower.") and ".layers." in k]
    assert vision_blocks, "the tiny SigLIP tower should have encoder layers"
    assert {family.layer_index(k) for k in vision_blocks} == {None}
    assert family.layer_index("language_model.model.layers.1.self_attn.q_norm.weight") == 1


def test_gemma3_in_memory_names(saved, registry):
    """In memory transformers 5 names the tensors model.language_model.*; a raw state-dict dump keeps them."""
    model, config, _ = saved("gemma3-untied")
    family = family_for(config, registry)
    names = list(model.state_dict())
    assert [n for n in names if family.is_embedding(n)] == ["model.language_model.embed_tokens.weight"]
    assert [n for n in names if family.is_lm_head(n)] == ["lm_head.weight"]
    prefix = "model.language_model.layers."
    for n in names:
        expected = int(n[len(prefix):].split(".", 1)[0]) if n.startswith(prefix) else None
        assert family.layer_index(n) == expected, n


@pytest.mark.parametrize("case_id", ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "gemma3"])
def test_embedding_scale_matches_the_model(case_id, saved, registry):
    model, config, _ = saved(case_id)
    family = family_for(config, registry)
    embed = model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 63]])
    ratio = embed(ids) / embed.weight[ids]
    scale = family.embedding_scale(config)
    if case_id.startswith("gemma"):
        assert scale == 4.0  # sqrt(hidden_size 16)
        torch.testing.assert_close(ratio, torch.full_like(ratio, 4.0))
    else:
        assert scale is None
        torch.testing.assert_close(ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("model_type,config_cls", [
    ("llama", "LlamaConfig"), ("mistral", "MistralConfig"), ("qwen2", "Qwen2Config"), ("qwen2_moe", "Qwen2MoeConfig"),
    ("gemma", "GemmaConfig"), ("gemma2", "Gemma2Config"), ("gemma3_text", "Gemma3TextConfig"),
    ("gemma3", "Gemma3Config"),
])
def test_tied_default_is_transformers_default(model_type, config_cls, registry):
    family = family_for({"model_type": model_type}, registry)
    transformers_default = getattr(transformers, config_cls)().tie_word_embeddings
    assert family.ties_embeddings_by_default is transformers_default
    assert family.tied_embeddings({"model_type": model_type}) is transformers_default
    assert family.tied_embeddings({"model_type": model_type, "tie_word_embeddings": not transformers_default}) is (
        not transformers_default)


def test_hub_style_gemma3_config(registry):
    # The shape of google/gemma-3-4b-it's config.json: no tie key anywhere, text settings nested.
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34,
                              "vocab_size": 262208}, "vision_config": {"model_type": "siglip_vision_model"}}
    family = family_for(config, registry)
    assert family.name == "gemma3"
    assert family.tied_embeddings(config) is True
    assert family.tied_embeddings({**config, "tie_word_embeddings": False}) is False
    assert family.num_layers(config) == 34
    assert family.vocab_size(config) == 262208
    assert family.embedding_scale(config) == pytest.approx(math.sqrt(2560))


@pytest.mark.parametrize("config", [
    {"model_type": "gemma"},
    {"model_type": "gemma2", "hidden_size": 0},
    {"model_type": "gemma3", "text_config": {"hidden_size": "2560"}},
])
def test_embedding_scale_rejects_a_bad_hidden_size(config, registry):
    family = family_for(config, registry)
    with pytest.raises(MergeplugError, match=rf"{family.name} model has hidden_size .*sqrt\(hidden_size\)"):
        family.embedding_scale(config)


def test_registration_through_the_plugin_manager(registry):
    routes = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen2_moe": "qwen2", "gemma": "gemma",
              "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3"}
    for model_type, name in routes.items():
        assert family_for({"model_type": model_type}, registry).name == name
    for name in FAMILY_NAMES:
        component = registry.get("family", name)
        family = component.load()
        assert registry.plugins[f"families.{name}"].status == "ok"
        assert component.plugin == f"families.{name}"
        assert component.extra["model_types"] == list(family.model_types)
        assert component.reference.startswith("arXiv:")
        assert family.name == name and family.notes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(family_for({"model_type": "gemma2"}, registry)).__name__ == "Gemma2Family"
    with pytest.warns(UserWarning, match="no model family plugin knows model_type 'no_such_type'"):
        assert type(family_for({"model_type": "no_such_type"}, registry)) is ModelFamily
    claimed = [t for name in FAMILY_NAMES for t in registry.get("family", name).extra["model_types"]]
    assert sorted(claimed) == sorted(routes)  # no type claimed twice, none beyond the table (e.g. mixtral)
