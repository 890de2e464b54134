"""Tiny models for the backend tests, built once per session (about a second), and a hand-written reference.

- ``tiny``: folders of tiny models sharing one trained tokenizer: ``llama`` (no chat template in its tokenizer,
  no BOS added), ``templated`` (the same weights, with a chat template in its tokenizer: ``tiny.template``),
  ``bos`` (the same weights, a tokenizer that adds <s>), ``gemma`` and ``mistral`` (a family with no chat
  template of its own).
- ``open_tiny(model="llama", **options)``: the transformers backend opened on one of them, without a progress bar.
- ``reference``: the one-prompt-at-a-time ground truth computed by hand from the model's logits (no
  ``generate``, no padding, no KV cache): greedy argmax continuations and log-softmax sums.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

BOS, EOS = 2, 3  # the tiny tokenizer's <s> and </s>
TOKENIZER_TEMPLATE = ("{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    from tokenizers import processors
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("backends")
    tokenizer_folder = train_tiny_tokenizer(root / "tokenizer")
    llama = make_tiny_model(root / "llama", "llama", seed=0, tokenizer_folder=tokenizer_folder)
    templated = root / "templated"
    shutil.copytree(llama, templated)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    tokenizer.chat_template = TOKENIZER_TEMPLATE
    tokenizer.save_pretrained(str(templated))
    bos = root / "bos"
    shutil.copytree(llama, bos)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer.save_pretrained(str(bos))
    gemma = make_tiny_model(root / "gemma", "gemma", seed=1, tokenizer_folder=tokenizer_folder)
    mistral = make_tiny_model(root / "mistral", "mistral", seed=2, tokenizer_folder=tokenizer_folder)
    return SimpleNamespace(root=Path(root), llama=llama, templated=templated, bos=bos, gemma=gemma, mistral=mistral,
                           template=TOKENIZER_TEMPLATE)


@pytest.fixture
def open_tiny(tiny, monkeypatch):
    from mergeplug.runner import open_backend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opened = []

    def open_(model: str = "llama", **options):
        options.setdefault("progress", False)
        options.setdefault("device", "cpu")
        backend = open_backend("transformers", str(getattr(tiny, model)), **options)
        opened.append(backend)
        return backend

    yield open_
    for backend in opened:
        backend.close()


class Reference:
    """Ground truth for one model folder, one prompt at a time, from full forward passes."""

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def ids(self, text: str, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Argmax continuation, stopping after max_new_tokens or at eos (eos itself kept, as generate does)."""
        ids, new = list(prompt_ids), []
        with self.torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.model(self.torch.tensor([ids])).logits[0, -1]
                token = int(logits.argmax())
                ids.append(token)
                new.append(token)
                if token == EOS:
                    break
        return new

    def greedy_text(self, prompt: str, max_new_tokens: int) -> str:
        return self.tokenizer.decode(self.greedy_ids(self.ids(prompt), max_new_tokens), skip_special_tokens=True)

    def logprobs(self, tokens: list[int]):
        """log_softmax of the logits at every position of ``tokens`` (row p predicts token p + 1)."""
        with self.torch.no_grad():
            return self.torch.log_softmax(self.model(self.torch.tensor([tokens])).logits[0].float(), dim=-1)

    def score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        tokens = context_ids + continuation_ids
        logprobs = self.logprobs(tokens)
        total, greedy = 0.0, True
        for position in range(len(context_ids), len(tokens)):
            row = logprobs[position - 1]
            total += float(row[tokens[position]])
            greedy = greedy and int(row.argmax()) == tokens[position]
        return total, greedy


@pytest.fixture(scope="session")
def reference(tiny) -> Reference:
    return Reference(tiny.llama)
