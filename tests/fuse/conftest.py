"""Tiny models with different tokenizers for the fusion tests, built once per session (a few seconds).

- ``pivot``: a Metaspace BPE tokenizer (vocabulary 100: numbers split into digits) that adds ``<s>``; a tiny
  Llama trained briefly on plain sentences, so it knows neither synthetic pattern below;
- ``counter``: a byte-level BPE tokenizer (vocabulary 300, no BOS); a tiny Llama trained on ``count:`` lines,
  numbers that go up by one (``count: 41 42 43 44``);
- ``speller``: a Unigram tokenizer (vocabulary 150) that adds ``<s>``; a tiny Llama trained on ``spell:`` lines,
  letters that follow the alphabet (``spell: g h i j``).

Held-out lines start at numbers and letters none of them was trained on. Tests reach the texts and helpers
through the ``kit`` fixture (test modules cannot import this file under ``--import-mode=importlib``).
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from mergeplug.testing import TINY_CORPUS

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]  # ids 0..3, as mergeplug.testing.tiny_config expects
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def count_line(start: int, n: int = 6) -> str:
    return "count: " + " ".join(str(v) for v in range(start, start + n))


def spell_line(start: int, n: int = 6) -> str:
    return "spell: " + " ".join(LETTERS[start:start + n])


COUNT_TRAIN = [count_line(s) for s in range(10, 80) if s % 5 != 0]
COUNT_HELD_OUT = [count_line(s) for s in (15, 35, 55, 75)]
SPELL_TRAIN = [spell_line(s, n) for s in range(0, 20) for n in (5, 6) if s not in (3, 11)]
SPELL_HELD_OUT = [spell_line(s) for s in (3, 11)]
GENERAL = list(TINY_CORPUS)


def train_tokenizer(folder: Path, kind: str, vocab_size: int, texts: list[str], bos: bool) -> Path:
    """A fast tokenizer of ``kind`` (``bpe``: Metaspace BPE; ``bytelevel``: GPT-2-style BPE; ``unigram``) trained
    on ``texts`` and saved to ``folder``; ``bos`` makes it add ``<s>`` in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    elif kind == "bytelevel":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>",
                                          show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(folder))
    return folder


def train_model(folder: Path, texts: list[str], *, seed: int, steps: int, lr: float = 1e-2, hidden: int = 48) -> Path:
    """A fresh tiny Llama for the tokenizer in ``folder``, trained ``steps`` steps on ``texts`` (batches of 16,
    padded), saved into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeplug.testing import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=hidden, num_layers=2, heads=4, kv_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, min(16, len(encoded)))
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([x + [1] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    model.save_pretrained(str(folder))
    return folder


def continuation_nll(model_folder: Path, lines: list[str], prefix_chars: int = 13) -> float:
    """Mean log-loss per character of each line's continuation (the tokens starting at or after character
    ``prefix_chars``: what follows ``count: 41 42`` / ``spell: g h i``), under the model in ``model_folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    model = AutoModelForCausalLM.from_pretrained(str(model_folder)).eval()
    total, characters = 0.0, 0
    for line in lines:
        encoded = tokenizer(line, return_offsets_mapping=True)
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        gold = logp.gather(-1, ids[0, 1:, None])[:, 0]
        starts = [start for start, _ in encoded["offset_mapping"][1:]]
        keep = torch.tensor([s >= prefix_chars for s in starts])
        total -= float(gold[keep].sum())
        characters += len(line) - prefix_chars
    return total / characters


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The texts and helpers of this file."""
    return SimpleNamespace(general=GENERAL, count_train=COUNT_TRAIN, count_held_out=COUNT_HELD_OUT,
                           spell_train=SPELL_TRAIN, spell_held_out=SPELL_HELD_OUT, count_line=count_line,
                           spell_line=spell_line, train_tokenizer=train_tokenizer, train_model=train_model,
                           continuation_nll=continuation_nll)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> SimpleNamespace:
    root = Path(tmp_path_factory.mktemp("fuse-models"))
    everything = GENERAL * 3 + COUNT_TRAIN + SPELL_TRAIN + COUNT_HELD_OUT + SPELL_HELD_OUT
    pivot = train_tokenizer(root / "pivot", "bpe", 100, everything, bos=True)
    counter = train_tokenizer(root / "counter", "bytelevel", 300, everything, bos=False)
    speller = train_tokenizer(root / "speller", "unigram", 150, everything, bos=True)
    with single_thread():
        train_model(pivot, GENERAL * 4, seed=0, steps=20)
        train_model(counter, COUNT_TRAIN, seed=1, steps=60, lr=2e-2)
        train_model(speller, SPELL_TRAIN, seed=2, steps=60, lr=2e-2)
    return SimpleNamespace(root=root, pivot=pivot, counter=counter, speller=speller)


@contextlib.contextmanager
def single_thread():
    """One torch thread: on a shared 2-core machine, two OpenMP threads that wait for each other make a tiny
    model's step up to a hundred times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path_factory):
    """No hub access, and the aligners' cache in a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MERGEPLUG_CACHE", str(tmp_path_factory.getbasetemp() / "mergeplug-cache"))
