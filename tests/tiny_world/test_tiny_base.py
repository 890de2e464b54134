"""build_tiny_base on a very small setting: a loadable model and tokenizer that round-trips the domains' text."""
from __future__ import annotations

import json

import pytest

from mergeplug import MergeplugError
from mergeplug.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, load_rows, render_training_example
from mergeplug.plugins import Registry
from mergeplug.tiny import BASE_FILE, TINY_DEFAULTS, TINY_SMALLER, build_tiny_base, format_pieces

DOMAINS = ["tiny_arithmetic", "tiny_functions", "tiny_formats", "tiny_translation", "tiny_refusal"]
SMALL = dict(vocab_size=400, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, max_seq_length=96,
             max_steps=2, batch_size=2, seed=3, limit=300)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path_factory.mktemp("tiny") / "base"
    try:
        yield build_tiny_base(DOMAINS, out, progress=False, offline=True, device="cpu", **SMALL)
    finally:
        mp.undo()


@pytest.mark.slow
def test_the_base_loads_and_its_tokenizer_round_trips_domain_text(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (
        "llama", 32, 1, 2, 1, 64, 96)
    assert config.vocab_size == len(tokenizer) <= 400
    registry = Registry()
    for name in DOMAINS:
        domain = registry.get("domain", name).load()
        row = load_rows(domain.training[0], offline=True).rows[0]
        prompt, response = render_training_example(domain, row)
        ids = tokenizer(prompt + response)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id == config.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + response
    preamble, response_mark = ALPACA_NO_INPUT.split("{instruction}")
    assert tokenizer(preamble, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(preamble)]
    assert len(tokenizer(response_mark, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 12", add_special_tokens=False)["input_ids"]) == ["Ġ1", "2"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (config.eos_token_id, config.pad_token_id)


@pytest.mark.slow
def test_the_base_was_trained_on_the_mixture_and_the_output_written_atomically(base):
    summary = json.loads((base / "mergeplug_finetune.json").read_text())
    assert (summary["domains"], summary["steps"], summary["finetuner"]) == (DOMAINS, 2, "full")
    record = json.loads((base / BASE_FILE).read_text())
    assert record["domains"] == DOMAINS and record["hidden"] == 32 and record["max_steps"] == 2
    assert not [p.name for p in base.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    with pytest.raises(MergeplugError, match="already exists"):
        build_tiny_base(DOMAINS, base, offline=True, **SMALL)


def test_bad_sizes_are_errors_before_any_work(tmp_path):
    with pytest.raises(MergeplugError, match="hidden=30 must be a multiple of heads=4"):
        build_tiny_base(DOMAINS, tmp_path / "a", hidden=30, heads=4, kv_heads=2, offline=True)
    with pytest.raises(MergeplugError, match=r"layers=0.*positive whole numbers"):
        build_tiny_base(DOMAINS, tmp_path / "b", layers=0, offline=True)
    with pytest.raises(MergeplugError, match="vocab_size=100 is below"):
        build_tiny_base(["tiny_translation"], tmp_path / "c", vocab_size=100, offline=True)
    assert not list(tmp_path.iterdir())


def test_format_pieces_of_an_alpaca_domain_are_its_fixed_text():
    domain = Registry().get("domain", "tiny_arithmetic").load()
    preamble, response_mark = ALPACA_NO_INPUT.split("{instruction}")
    preamble_with_input, input_mark, _ = ALPACA_WITH_INPUT.replace("{input}", "{instruction}").split("{instruction}")
    assert format_pieces(domain) == [preamble, response_mark, preamble_with_input, input_mark]
    assert input_mark == "\n\n### Input:\n" and response_mark == "\n\n### Response:\n"


def test_the_settings_fit_build_tiny_base_and_the_finetuner():
    import inspect

    from mergeplug.finetuning import training_schema

    accepted = set(inspect.signature(build_tiny_base).parameters)
    for settings in (TINY_DEFAULTS, TINY_SMALLER):
        assert set(settings["base"]) <= accepted
        assert set(settings["finetune"]) <= set(training_schema()["properties"])
        assert settings["runtime"]["torch_threads"] >= 1
