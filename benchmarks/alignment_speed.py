"""Token alignment speed on over a million tokens of real text (Python code and English docs on this machine).

    python benchmarks/alignment_speed.py [--work /tmp/mergeplug-alignment-bench] [--quick]

Two tokenizers are trained here with `tokenizers` and cached under --work: the *source*, a 32k byte-level BPE
(GPT-2 style, appends an EOS), and the *pivot*, a 100k Unigram with SentencePiece's metaspace (prepends a BOS).
The corpus is the standard library's .py files and site-packages' .md/.rst docs, cut into documents of at most
--doc-chars characters at line ends. Printed: tokenisation time (not counted in any rate); source tokens aligned
per second by character offsets; each aligner's fit time and its top-k map rate (--top-k, random source ids and
log-softmax values: the map's cost does not depend on the values; the mined fit also reversed, pivot onto
source, unless --skip-reversed); offsets + mined map end to end (align, pick
the paired source position, map its top-k onto pivot ids); and how often FuseLLM's edit-distance dynamic
programme pairs each pivot token with the same source tokens as the offsets do, on a sample of documents.
--quick: small vocabularies (2k/4k) and a 300k-character corpus, seconds instead of minutes.
"""
from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path


def corpus(limit_chars: int, doc_chars: int) -> list[str]:
    """Half code (stdlib .py), half docs (site-packages .md/.rst), sorted by path: the same text on every run."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    code = (p for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts and "test" not in p.parts)
    docs = (p for p in sorted([*site.rglob("*.md"), *site.rglob("*.rst")]))
    texts: list[str] = []
    for files in (code, docs):
        budget = limit_chars // 2
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            budget -= len(text)
            texts.extend(_documents(text, doc_chars))
            if budget <= 0:
                break
    return texts


def _documents(text: str, doc_chars: int) -> list[str]:
    out, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > doc_chars and current:
            out.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current and size:
        out.append("".join(current))
    return [d for d in out if d.strip()]


def train_tokenizers(work: Path, texts: list[str], source_size: int, pivot_size: int):
    """The source BPE and pivot Unigram, trained on ``texts`` once and then loaded from ``work``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source_dir, pivot_dir = work / f"bpe-{source_size}", work / f"unigram-{pivot_size}"
    if not (source_dir / "tokenizer.json").is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=source_size, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        eos = bpe.token_to_id("<|endoftext|>")
        bpe.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                           special_tokens=[("<|endoftext|>", eos)])
        PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                unk_token="<|endoftext|>").save_pretrained(str(source_dir))
    if not (pivot_dir / "tokenizer.json").is_file():
        uni = Tokenizer(models.Unigram())
        uni.pre_tokenizer = pre_tokenizers.Metaspace()
        uni.decoder = decoders.Metaspace()
        uni.train_from_iterator(texts, trainers.UnigramTrainer(
            vocab_size=pivot_size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
            max_piece_length=24, seed_size=2_000_000, show_progress=False))
        uni.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(str(pivot_dir))
    return AutoTokenizer.from_pretrained(str(source_dir)), AutoTokenizer.from_pretrained(str(pivot_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergeplug-alignment-bench"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chars", type=int, default=None, help="corpus size in characters (default 10M, quick 300k)")
    parser.add_argument("--doc-chars", type=int, default=4000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dp-docs", type=int, default=None, help="documents in the DP agreement sample")
    parser.add_argument("--skip-reversed", action="store_true", help="skip the mined fit pivot -> source")
    args = parser.parse_args()

    import os
    import tempfile

    import numpy as np

    from mergeplug.alignment import align_by_edit_distance, align_many, tokenize_many
    from mergeplug.plugins import Registry
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long documents: no "sequence longer than max length" notices
    chars = args.chars or (300_000 if args.quick else 10_000_000)
    source_size, pivot_size = (2_000, 4_000) if args.quick else (32_000, 100_000)
    dp_docs = args.dp_docs or (10 if args.quick else 40)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []

    t0 = time.perf_counter()
    texts = corpus(chars, args.doc_chars)
    t1 = time.perf_counter()
    source_tok, pivot_tok = train_tokenizers(args.work, texts, source_size, pivot_size)
    t2 = time.perf_counter()
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters ({t1 - t0:.1f} s); "
          f"tokenizers: source {len(source_tok)} BPE, pivot {len(pivot_tok)} Unigram ({t2 - t1:.1f} s, cached in {args.work})")

    batch = 512

    def tokenize_all(tokenizer):
        start = time.perf_counter()
        out = [t for lo in range(0, len(texts), batch) for t in tokenize_many(tokenizer, texts[lo:lo + batch])]
        return out, time.perf_counter() - start

    sources, t_src = tokenize_all(source_tok)
    pivots, t_piv = tokenize_all(pivot_tok)
    n_src, n_piv = sum(map(len, sources)), sum(map(len, pivots))
    rows.append(("tokenise source (not counted below)", f"{n_src:,} tokens in {t_src:.2f} s"))
    rows.append(("tokenise pivot (not counted below)", f"{n_piv:,} tokens in {t_piv:.2f} s"))

    def rate(tokens: int, seconds: float) -> str:
        return f"{tokens / seconds / 1e6:6.2f}M source tokens/s ({seconds:.2f} s)"

    start = time.perf_counter()
    alignments = [a for lo in range(0, len(texts), batch) for a in align_many(pivots[lo:lo + batch], sources[lo:lo + batch])]
    t_align = time.perf_counter() - start
    rows.append(("sequence alignment by offsets", rate(n_src, t_align)))
    sizes = [a.group_sizes() for a in alignments]
    shapes = {"1:1": 0, "1:n": 0, "n:1": 0, "n:m": 0}
    for p, s in sizes:
        shapes["1:1"] += int(np.sum((p == 1) & (s == 1)))
        shapes["1:n"] += int(np.sum((p == 1) & (s > 1)))
        shapes["n:1"] += int(np.sum((p > 1) & (s == 1)))
        shapes["n:m"] += int(np.sum((p > 1) & (s > 1)))
    unpaired = sum(int(np.sum(a.source_group < 0)) for a in alignments)
    rows.append(("groups (pivot:source tokens)", ", ".join(f"{k} {v:,}" for k, v in shapes.items())
                 + f"; unpaired source tokens {unpaired:,}"))

    registry = Registry()
    rng = np.random.default_rng(0)
    k = args.top_k
    map_positions = min(n_src, 1_000_000)
    topk_ids = rng.integers(0, len(source_tok), size=(map_positions, k))
    logits = rng.standard_normal((map_positions, k)).astype(np.float32)
    topk_logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))

    fitted = {}
    # A fresh cache folder: the first mined fit computes (and writes), the second reads.
    os.environ["MERGEPLUG_CACHE"] = tempfile.mkdtemp(prefix="cache-", dir=args.work)
    for name, corpus_pairs in (("mined", None), ("statistical", list(zip(sources, pivots)))):
        cls = registry.get("aligner", name).load()
        start = time.perf_counter()
        aligner = cls({}).fit(source_tok, pivot_tok, corpus_pairs)
        fit_s = time.perf_counter() - start
        fitted[name] = aligner
        if name == "mined":
            d = aligner.distances
            detail = (f": exact {np.sum(d == 0):,}, 1 edit {np.sum(d == 1):,}, 2+ edits {np.sum(d >= 2):,}, "
                      f"unmapped {np.sum(aligner.token_map < 0):,}")
        else:
            detail = f" (aligning the corpus included): {int(aligner.observed.sum()):,} tokens mapped from counts"
        rows.append((f"{name} fit ({len(source_tok):,} -> {len(pivot_tok):,})", f"{fit_s:.2f} s{detail}"))
    cls = registry.get("aligner", "mined").load()
    start = time.perf_counter()
    cls({}).fit(source_tok, pivot_tok)
    rows.append(("mined fit again, from the disk cache", f"{time.perf_counter() - start:.2f} s"))
    if not args.skip_reversed:
        start = time.perf_counter()
        cls({"cache": False}).fit(pivot_tok, source_tok)
        rows.append((f"mined fit, reversed ({len(pivot_tok):,} -> {len(source_tok):,})",
                     f"{time.perf_counter() - start:.2f} s"))
    try:
        registry.get("aligner", "exact").load()().fit(source_tok, pivot_tok)
    except Exception as exc:  # noqa: BLE001 - the one-line refusal is the figure shown
        rows.append(("exact fit on different vocabularies", str(exc)[:110] + "..."))
    fitted["exact"] = registry.get("aligner", "exact").load()().fit(source_tok, source_tok)

    fitted["mined"].map_distribution(topk_ids[:100_000], topk_logprobs[:100_000])  # first touch of the buffers
    for name, aligner in fitted.items():
        start = time.perf_counter()
        aligner.map_distribution(topk_ids, topk_logprobs)
        label = f"{name} map of top-{k} distributions" + (" (source onto itself)" if name == "exact" else "")
        rows.append((label, rate(map_positions, time.perf_counter() - start)))

    mined = fitted["mined"]
    src_logits = [(rng.integers(0, len(source_tok), size=(len(s), k)),
                   np.full((len(s), k), -np.log(k), np.float32)) for s in sources]
    start = time.perf_counter()
    for lo in range(0, len(texts), batch):
        for a, (ids, lp) in zip(align_many(pivots[lo:lo + batch], sources[lo:lo + batch]), src_logits[lo:lo + batch]):
            mined.align_distributions(a, ids, lp)
    rows.append((f"offsets + mined map, end to end (top-{k})", rate(n_src, time.perf_counter() - start)))

    sample = [i for i in np.linspace(0, len(texts) - 1, dp_docs).astype(int).tolist()]
    agree = total = 0.0
    dp_tokens, start = 0, time.perf_counter()
    for i in sample:
        text = texts[i][:800]  # the DP is quadratic: a few hundred tokens per document
        (p,), (s,) = tokenize_many(pivot_tok, [text]), tokenize_many(source_tok, [text])
        by_dp, by_offsets = align_by_edit_distance(p, s), align_many([p], [s])[0]
        agree += by_dp.agreement(by_offsets) * len(p)
        total += len(p)
        dp_tokens += len(s)
    t_dp = time.perf_counter() - start
    rows.append(("DP pairs agreeing with offsets' pairs", f"{agree / total:.1%} of {int(total):,} pivot tokens "
                 f"in {len(sample)} documents (DP: {dp_tokens / t_dp:,.0f} source tokens/s)"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  result")
    print(f"{'-' * width}  {'-' * 60}")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
