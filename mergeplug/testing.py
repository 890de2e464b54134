"""Tiny models and tokenizers for tests: public, so plugin authors' tests can merge real checkpoints in seconds.

``make_tiny_model`` writes a Hugging Face folder (config.json, safetensors, tokenizer) of a few thousand
parameters; with ``base=`` it writes a "finetune": a copy of the base plus seeded Gaussian noise, so task
vectors are non-zero and known to be small. Everything is deterministic in ``seed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import copy_tokenizer_files

#: A few sentences to train the tiny tokenizer on (any text works; this one covers letters, digits, punctuation).
TINY_CORPUS = [
    "Merging combines the weights of several finetuned models into one model.",
    "Task arithmetic adds scaled task vectors to the base model's weights.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
    "Question: what is 12 plus 30? Answer: 42.",
    "def add(a, b):\n    return a + b\n",
    "Bonjour, comment allez-vous? Hola, que tal? Guten Tag, wie geht es?",
    "Safety matters: refuse harmful requests, help with the rest.",
    "Instructions: write three words, in capital letters, separated by commas.",
]

_FAMILY_CONFIGS = {
    # family -> (transformers config class name, extra arguments); tie_word_embeddings follows each family's default.
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"tie_word_embeddings": True}),
}


def train_tiny_tokenizer(folder: str | Path, vocab_size: int = 256) -> Path:
    """Train a BPE tokenizer of at most ``vocab_size`` tokens on :data:`TINY_CORPUS` and save it to ``folder``.

    Special tokens: ``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3. Metaspace pre-tokenisation, so decoding
    gives the spaces back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(folder))
    return folder


def tiny_config(family: str = "llama", *, num_layers: int = 2, hidden: int = 32, vocab_size: int = 256,
                intermediate: int | None = None, heads: int = 4, kv_heads: int = 2, **overrides: Any):
    """A transformers config of ``family`` with tiny sizes (bos 2, eos 3, pad 1 match the tiny tokenizer)."""
    import transformers

    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(_FAMILY_CONFIGS)}")
    class_name, extra = _FAMILY_CONFIGS[family]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=1,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, class_name)(**kwargs)


def make_tiny_model(
    folder: str | Path,
    family: str = "llama",
    seed: int = 0,
    base: str | Path | None = None,
    noise: float = 0.02,
    num_layers: int = 2,
    hidden: int = 32,
    vocab_size: int = 256,
    dtype=None,
    tokenizer_folder: str | Path | None = None,
    max_shard_size: str | int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny causal LM to ``folder`` and return the folder.

    Without ``base``: a fresh ``family`` model, randomly initialised from ``seed``. With ``base`` (a folder
    written by this function): the base's weights plus ``noise`` × N(0, 1), drawn from ``seed``; its config
    is the base's (``vocab_size`` may differ, to make a model with a larger vocabulary: new rows are drawn
    like the noise around the mean embedding). ``max_shard_size`` (e.g. ``"20KB"``) forces sharded files;
    ``tokenizer_folder`` is copied in.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    if base is None:
        config = tiny_config(family, num_layers=num_layers, hidden=hidden, vocab_size=vocab_size, **config_overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Deterministic, seed-derived weights (transformers' init order may change between versions).
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.dim() == 1:  # norms: around one, so the model behaves
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        if vocab_size != model.config.vocab_size:
            old = model.get_input_embeddings().weight.detach().clone()
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
            with torch.no_grad():
                emb = model.get_input_embeddings().weight
                rows = min(old.shape[0], vocab_size)
                emb[:rows] = old[:rows]
                if vocab_size > old.shape[0]:
                    emb[rows:] = old.mean(0) + noise * torch.randn(emb[rows:].shape, generator=generator)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.add_(noise * torch.randn(param.shape, generator=generator))
    model = model.to(dtype)
    model.config.dtype = dtype
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer_folder is not None:
        copy_tokenizer_files(Path(tokenizer_folder), folder)
    return folder
