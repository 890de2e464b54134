"""The vLLM backend without vLLM: the missing-package message, and the request -> vLLM mapping and the parsing
of its results checked against a fake ``vllm`` module put into ``sys.modules``."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, Loglikelihood, LoglikelihoodResult
from mergeplug.runner import Backend, open_backend

MISSING = "backend vllm: vllm is not installed: pip install vllm (Linux, CUDA GPU), or use --backend transformers"


class FakeLLM:
    """Records what the backend asks for and answers like vllm.LLM does, with made-up but known values."""

    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        self.calls: list[tuple[list, object, bool]] = []
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len", 64)))

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, use_tqdm))
        outputs = []
        for i, prompt in enumerate(prompts):
            params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            ids = prompt["prompt_token_ids"]
            if getattr(params, "prompt_logprobs", None):
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text="x")],
                                               prompt_logprobs=[None] + [fake_logprobs(p, t) for p, t in enumerate(ids) if p]))
            else:
                texts = [f"answer {i}.{j} STOP tail" for j in range(params.n)]
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in texts], prompt_logprobs=None))
        return outputs


def fake_logprobs(position: int, token: int) -> dict:
    """Position p's prompt token has log-probability -p/10; it is the top-1 token unless p is a multiple of 3."""
    chosen = SimpleNamespace(logprob=-position / 10, rank=2 if position % 3 == 0 else 1)
    return {token: chosen, 10_000: SimpleNamespace(logprob=-0.01, rank=1 if chosen.rank == 2 else 2)}


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)
        self.n = kwargs.get("n", 1)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return module


def test_without_vllm_the_message_says_how_to_get_it(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(MergeplugError) as caught:
        open_backend("vllm", str(tiny.llama))
    assert str(caught.value) == MISSING


def test_registered_through_the_real_plugin_manager():
    from mergeplug.plugins import Registry
    from mergeplug.schema import check_schema, load_schema, problems
    from mergeplug_plugins.backends.vllm.backend import VllmBackend

    component = Registry().get("backend", "vllm")
    assert component.load() is VllmBackend and issubclass(VllmBackend, Backend)
    assert component.reference == "arXiv:2309.06180"
    assert check_schema(component.parameters) == []
    assert problems(component.parameters, load_schema("component-parameters"), source="vllm") == []


def test_llm_arguments(fake_vllm, tiny):
    backend = open_backend("vllm", str(tiny.llama), dtype="bf16", trust_remote_code=True, max_length=48)
    assert backend._llm.kwargs == {"model": str(tiny.llama), "dtype": "bfloat16", "trust_remote_code": True, "seed": 0,
                                   "max_model_len": 48}
    assert backend.context_length == 48
    assert open_backend("vllm", str(tiny.llama)).context_length == 64  # from the engine's max_model_len
    with pytest.raises(MergeplugError, match=r"backend 'vllm': options\.device: 'cpu' is not one of \['auto', 'cuda'\]"):
        open_backend("vllm", str(tiny.llama), device="cpu")
    with pytest.raises(MergeplugError, match="no such folder"):
        open_backend("vllm", str(tiny.root / "missing"))


def test_generate_maps_each_request_to_sampling_params_and_parses_texts(fake_vllm, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.llama))
    backend = open_backend("vllm", str(tiny.llama), progress=False, ignore_eos=True)
    requests = [
        Generate("Question: what is 12?", max_new_tokens=20, stop=("STOP",), temperature=0.2, top_p=0.95, samples=2,
                 seed=5),
        Generate("Hola", max_new_tokens=8),
        Generate("Hola", max_new_tokens=8, samples=3),  # greedy: asked once, copied
    ]
    answers = backend.generate(requests)
    assert answers == [["answer 0.0 ", "answer 0.1 "], ["answer 1.0 STOP tail"], ["answer 2.0 STOP tail"] * 3]
    ((prompts, params, use_tqdm),) = backend._llm.calls
    assert use_tqdm is False
    assert prompts == [{"prompt_token_ids": tokenizer(r.prompt)["input_ids"]} for r in requests]
    assert [p.kwargs for p in params] == [
        dict(n=2, temperature=0.2, top_p=0.95, max_tokens=20, stop=["STOP"], seed=5, ignore_eos=True),
        dict(n=1, temperature=0.0, top_p=1.0, max_tokens=8, stop=None, seed=0, ignore_eos=True),
        dict(n=1, temperature=0.0, top_p=1.0, max_tokens=8, stop=None, seed=0, ignore_eos=True),
    ]


def test_long_prompts_are_cut_from_the_left_like_the_transformers_backend(fake_vllm, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.llama))
    prompt = "The quick brown fox jumps over the lazy dog 0123456789 times! " * 3
    backend = open_backend("vllm", str(tiny.llama), max_length=16, progress=False)
    with pytest.warns(UserWarning, match="cut from the left"):
        backend.generate([Generate(prompt, max_new_tokens=6)])
    ((prompts, _, _),) = backend._llm.calls
    assert prompts == [{"prompt_token_ids": tokenizer(prompt)["input_ids"][-10:]}]


def test_loglikelihood_sums_the_continuations_prompt_logprobs_and_reads_greedy_from_ranks(fake_vllm, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.llama))
    backend = open_backend("vllm", str(tiny.llama), progress=False)
    requests = [Loglikelihood("Question: what is 12", " plus 30"), Loglikelihood("Hola", ""), Loglikelihood("", "ab")]
    results = backend.loglikelihood(requests)
    ((prompts, params, _),) = backend._llm.calls
    assert params.kwargs == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
    context = tokenizer("Question: what is 12")["input_ids"]
    continuation = tokenizer(" plus 30", add_special_tokens=False)["input_ids"]
    empty_context = [2] + tokenizer("ab", add_special_tokens=False)["input_ids"]  # starts from <s>
    assert prompts == [{"prompt_token_ids": context + continuation}, {"prompt_token_ids": empty_context}]
    positions = range(len(context), len(context) + len(continuation))
    assert results[0] == LoglikelihoodResult(pytest.approx(sum(-p / 10 for p in positions)), len(continuation),
                                             all(p % 3 for p in positions))
    assert results[1] == LoglikelihoodResult(0.0, 0, True)  # nothing to score: no request sent
    positions = range(1, len(empty_context))
    assert results[2] == LoglikelihoodResult(pytest.approx(sum(-p / 10 for p in positions)), len(empty_context) - 1,
                                             all(p % 3 for p in positions))


def test_parse_prompt_logprobs_without_ranks_compares_logprobs():
    from mergeplug_plugins.backends.vllm.backend import parse_prompt_logprobs

    tokens = [2, 7, 8]
    top = [None, {7: SimpleNamespace(logprob=-0.5, rank=None), 9: SimpleNamespace(logprob=-1.0, rank=None)},
           {8: SimpleNamespace(logprob=-2.0, rank=None), 4: SimpleNamespace(logprob=-0.1, rank=None)}]
    assert parse_prompt_logprobs(top, tokens, 1, "m") == LoglikelihoodResult(-2.0, 1, False)
    assert parse_prompt_logprobs(top[:2], tokens[:2], 1, "m") == LoglikelihoodResult(-0.5, 1, True)
    with pytest.raises(MergeplugError, match="no prompt log-probabilities"):
        parse_prompt_logprobs(None, tokens, 1, "m")


def test_chat_template_renders_as_in_the_transformers_backend(fake_vllm, tiny):
    from transformers import AutoTokenizer

    from mergeplug.plugins import Registry

    tokenizer = AutoTokenizer.from_pretrained(str(tiny.llama))
    template = Registry().get("family", "llama").load().chat_template
    backend = open_backend("vllm", str(tiny.llama), chat_template=True, progress=False, max_length=128)
    backend.generate([Generate("Hola", max_new_tokens=4)])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hola"}], chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s><|start_header_id|>user")
    ((prompts, _, _),) = backend._llm.calls
    assert prompts == [{"prompt_token_ids": tokenizer(rendered, add_special_tokens=False)["input_ids"]}]
    with pytest.raises(MergeplugError, match="mistral model family gives none"):
        open_backend("vllm", str(tiny.mistral), chat_template=True)
