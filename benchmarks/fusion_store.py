"""Size of the fusion distribution store (bytes per stored token, MB per million tokens) and its recording speed.

The store keeps, per real position, the token id and character span (4 + 8 bytes) and the top-k next-token ids
and log-probabilities (k · (4 + 2) bytes in float16, k · (4 + 4) in float32), plus 24 bytes per sequence and a
small header per shard (mergeplug.fusion). This records a corpus of text chunks from the Python standard
library's source with a tiny Llama (a BPE tokenizer trained here) or a model folder you give, for each k and
log-probability dtype, and prints the measured size.

    python benchmarks/fusion_store.py [--model FOLDER] [--texts 400] [--chars 2000] [--top-k 10 50]
"""
from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path


def stdlib_texts(count: int, chars: int) -> list[str]:
    """``count`` chunks of ``chars`` characters of the standard library's .py files (code and English)."""
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text) - chars, chars):
            texts.append(text[start:start + chars])
            if len(texts) == count:
                return texts
    return texts


def tiny_model(folder: Path, texts: list[str], vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mergeplug.testing import tiny_config

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(folder))
    config = tiny_config("llama", vocab_size=len(wrapped), hidden=64, num_layers=2, max_position_embeddings=2048)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="A causal LM folder to record with (default: a tiny Llama built here).")
    parser.add_argument("--texts", type=int, default=400, help="Corpus texts (chunks of the standard library).")
    parser.add_argument("--chars", type=int, default=2000, help="Characters per text.")
    parser.add_argument("--top-k", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--vocab", type=int, default=8000, help="Vocabulary of the tiny model's tokenizer.")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from mergeplug.fusion import StoreSettings, record_distributions

    texts = stdlib_texts(args.texts, args.chars)
    with tempfile.TemporaryDirectory(prefix="mergeplug-fusion-store-") as tmp:
        model = Path(args.model) if args.model else tiny_model(Path(tmp) / "model", texts, args.vocab)
        print(f"model {model if args.model else 'tiny Llama (hidden 64, 2 layers)'}; {len(texts)} texts of "
              f"{args.chars} characters")
        print(f"{'k':>4} {'dtype':>8} {'tokens':>9} {'bytes/token':>12} {'MB per 1M tokens':>17} "
              f"{'expected B/tok':>15} {'tokens/s':>9}")
        for k in args.top_k:
            for dtype, size in (("float16", 2), ("float32", 4)):
                start = time.perf_counter()
                store = record_distributions(model, texts, Path(tmp) / f"store-{k}-{dtype}", device=args.device,
                                             settings=StoreSettings(top_k=k, logprob_dtype=dtype), progress=False)
                seconds = time.perf_counter() - start
                expected = 12 + k * (4 + size)
                print(f"{k:>4} {dtype:>8} {store.tokens:>9} {store.bytes_per_token:>12.2f} "
                      f"{store.bytes_per_token:>17.1f} {expected:>15} {store.tokens / seconds:>9.0f}")


if __name__ == "__main__":
    main()
