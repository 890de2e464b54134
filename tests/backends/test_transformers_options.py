"""Chat templates, loading errors, options and registration of the transformers backend."""
from __future__ import annotations

import jinja2
import pytest

from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, Loglikelihood
from mergeplug.runner import Backend, open_backend
from mergeplug.schema import check_schema, defaults, load_schema, problems


def render(template: str, prompt: str) -> str:
    return jinja2.Template(template).render(messages=[{"role": "user", "content": prompt}], bos_token="<s>",
                                            add_generation_prompt=True)


def test_no_chat_template_by_default_the_prompt_is_raw(open_tiny):
    assert open_tiny().render("What is 2+2?") == "What is 2+2?"


def test_chat_template_true_uses_the_tokenizers_own_template(open_tiny, reference, tiny):
    backend = open_tiny("templated", chat_template=True)
    rendered = backend.render("what is 12 plus 30?")
    assert rendered == "[user] what is 12 plus 30?\n[assistant] "
    assert rendered == render(tiny.template, "what is 12 plus 30?")
    # Generation and scoring see the rendered prompt (same weights as the llama folder).
    assert backend.generate([Generate("what is 12 plus 30?", max_new_tokens=5)]) == [[reference.greedy_text(rendered, 5)]]
    (result,) = backend.loglikelihood([Loglikelihood("what is 12 plus 30?", " 42")])
    expected, _ = reference.score(reference.ids(rendered), reference.ids(" 42", special=False))
    assert result.logprob == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("model, family", [("llama", "llama"), ("gemma", "gemma")])
def test_chat_template_true_falls_back_to_the_model_familys(open_tiny, reference, model, family):
    from mergeplug.plugins import Registry

    template = Registry().get("family", family).load().chat_template
    assert isinstance(template, str)
    backend = open_tiny(model, chat_template=True)
    rendered = backend.render("Hi there")
    assert rendered == render(template, "Hi there")
    expected = {
        "llama": "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "gemma": "<s><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    }[family]
    assert rendered == expected
    if model == "llama":
        assert backend.generate([Generate("Hi there", max_new_tokens=4)]) == [[reference.greedy_text(rendered, 4)]]


def test_a_tokenizer_that_adds_bos_gets_one_bos_with_or_without_a_template(open_tiny, reference):
    from mergeplug.plugins import Registry

    raw = open_tiny("bos")
    expected, _ = reference.score([2, *reference.ids("Hola")], reference.ids(" que tal", special=False))
    assert raw.loglikelihood([Loglikelihood("Hola", " que tal")])[0].logprob == pytest.approx(expected, rel=1e-5)
    templated = open_tiny("bos", chat_template=True)  # the llama family's template writes <s> itself
    rendered = render(Registry().get("family", "llama").load().chat_template, "Hola")
    assert rendered.startswith("<s>")
    ids = templated._encode(templated.render("Hola"))
    assert ids == reference.ids(rendered) and ids[0] == 2 and ids[1] != 2
    assert templated.generate([Generate("Hola", max_new_tokens=4)]) == [[reference.greedy_text(rendered, 4)]]


def test_chat_template_true_without_any_template_is_a_clear_error(open_tiny):
    with pytest.raises(MergeplugError, match="has no chat template and the mistral model family gives none"):
        open_tiny("mistral", chat_template=True)


def test_a_template_string_is_used_as_given(open_tiny, reference):
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
    backend = open_tiny("templated", chat_template=template)  # the string wins over the tokenizer's template
    assert backend.render("Q") == "<<Q>> A:"
    with pytest.raises(MergeplugError, match="chat template fails to render"):
        open_tiny(chat_template="{% for m in messages %}{{ m.content | nofilter }}{% endfor %}").render("x")


def test_missing_model_folder_names_the_model_and_what_to_do(open_tiny, tiny, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MergeplugError, match=r"no-such-model: no such folder; give a local Hugging Face model folder"):
        open_backend("transformers", str(missing), device="cpu", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeplugError, match="the folder has no config.json"):
        open_backend("transformers", str(empty), device="cpu", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(MergeplugError, match="broken: cannot load its tokenizer"):
        open_backend("transformers", str(broken), device="cpu", progress=False)


def test_bad_options_are_user_errors(open_tiny):
    # Checked against the backend's parameters.json by open_backend, before the model is loaded.
    with pytest.raises(MergeplugError, match=r"backend 'transformers': options: unknown field 'beams'; allowed: batch_size"):
        open_tiny(beams=4)
    with pytest.raises(MergeplugError, match=r"options\.dtype: 'int8' is not one of"):
        open_tiny(dtype="int8")
    with pytest.raises(MergeplugError, match=r"options\.batch_size: 0 is less than the minimum of 1"):
        open_tiny(batch_size=0)
    with pytest.raises(MergeplugError, match=r"options\.chat_template"):
        open_tiny(chat_template=1)


def test_dtype_auto_is_float32_on_cpu_and_a_name_is_honoured(open_tiny):
    import torch

    assert open_tiny().torch_dtype == torch.float32
    backend = open_tiny(dtype="bf16")
    assert backend._model.dtype == torch.bfloat16
    assert open_tiny().context_length == 128  # max_position_embeddings of the tiny config


def test_close_frees_the_model_and_later_use_is_an_error(open_tiny):
    backend = open_tiny()
    backend.close()
    backend.close()  # closing twice is harmless
    with pytest.raises(MergeplugError, match="was closed"):
        backend.generate([Generate("hi", max_new_tokens=2)])


def test_registered_through_the_real_plugin_manager(tiny, monkeypatch):
    from mergeplug.plugins import Registry
    from mergeplug_plugins.backends.transformers.backend import TransformersBackend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    component = Registry().get("backend", "transformers")
    assert component.load() is TransformersBackend and issubclass(TransformersBackend, Backend)
    schema = component.parameters
    assert check_schema(schema) == []
    assert problems(schema, load_schema("component-parameters"), source="transformers") == []
    # The schema's defaults are the base class's, and the backend accepts every option it declares.
    assert defaults(schema) == {"device": "auto", "dtype": "auto", "batch_size": 16, "chat_template": False,
                                "max_length": None, "trust_remote_code": False, "ignore_eos": False}
    with open_backend("transformers", str(tiny.llama), progress=False, **{**defaults(schema), "device": "cpu"}) as backend:
        assert isinstance(backend, TransformersBackend)
        assert backend.generate([Generate("Hola", max_new_tokens=3)])[0][0]
    assert backend._model is None  # the context manager closed it
