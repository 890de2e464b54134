"""Generation throughput of the model runner against a one-prompt-at-a-time loop (issue 4).

Builds a small Llama with random weights (hidden 512, 4 blocks, intermediate 1376, 8 heads / 4 KV heads,
about 12M parameters) and the tiny trained tokenizer of ``mergeplug.testing`` in a temporary folder, then,
in one run and on the same model, measures new tokens per second of

- (a) a loop calling ``model.generate`` once per prompt (greedy, KV cache);
- (b) the ``transformers`` backend of the runner at batch sizes 1, 8 and 32 (length-sorted batches, left
  padding, KV cache).

32 prompts of 6 to 114 tokens, 64 new tokens each, greedy, with the end-of-sequence token ignored
(``min_new_tokens`` in the loop, ``ignore_eos`` in the backend) so that every configuration produces exactly the
same number of tokens. Each configuration runs ``--repeat`` times, interleaved, after one warm-up; the table
shows the median. Target: at least 5x the loop's throughput at batch 32.

    python benchmarks/generation_speed.py [--device auto] [--dtype auto] [--repeat 3] [--prompts 32] [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SIZES = dict(num_layers=4, hidden=512, intermediate=1376, heads=8, kv_heads=4, vocab_size=256,
             max_position_embeddings=512)
BATCH_SIZES = (1, 8, 32)
TARGET = 5.0


def build(folder: Path) -> Path:
    from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(folder / "tokenizer")
    return make_tiny_model(folder / "model", "llama", seed=0, tokenizer_folder=tokenizer, **SIZES)


def make_prompts(count: int) -> list[str]:
    """``count`` prompts of varied length: 1 to 6 corpus sentences, cut at a varying number of characters."""
    from mergeplug.testing import TINY_CORPUS

    prompts = []
    for i in range(count):
        sentences = [TINY_CORPUS[(i + k) % len(TINY_CORPUS)] for k in range(1 + i % 6)]
        text = " ".join(sentences)
        prompts.append(text[: 20 + (i * 37) % max(1, len(text) - 20)])
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps [default: auto]")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a capable GPU, else float32) or a dtype")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per configuration [default: 3]")
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts (at least 32) [default: 32]")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt [default: 64]")
    parser.add_argument("--folder", default=None, help="where to write the model [default: a temporary folder]")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.prompts < max(BATCH_SIZES) or args.repeat < 1:
        parser.error(f"--prompts must be at least {max(BATCH_SIZES)} and --repeat at least 1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeplug.evaluation import Generate
    from mergeplug.runner import open_backend

    with tempfile.TemporaryDirectory() as scratch:
        folder = build(Path(args.folder or scratch))
        backend = open_backend("transformers", str(folder), device=args.device, dtype=args.dtype, ignore_eos=True,
                               progress=False, batch_size=1)
        device, dtype = backend.device_name, backend.torch_dtype
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=device).eval()
        parameters = sum(p.numel() for p in model.parameters())
        prompts = make_prompts(args.prompts)
        lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
        n_new = args.max_new_tokens

        def sync():
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def loop(prompts_: list[str]) -> tuple[int, list[str]]:
            tokens, texts = 0, []
            with torch.inference_mode():
                for prompt in prompts_:
                    inputs = tokenizer(prompt, return_tensors="pt").to(device)
                    out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                    new = out[0, inputs["input_ids"].shape[1]:]
                    tokens += new.shape[0]
                    texts.append(tokenizer.decode(new, skip_special_tokens=True))
            return tokens, texts

        def runner(batch_size: int, prompts_: list[str]) -> tuple[int, list[str]]:
            backend.batch_size = batch_size  # one loaded model for every batch size
            answers = backend.generate([Generate(p, max_new_tokens=n_new) for p in prompts_])
            return len(prompts_) * n_new, [a[0] for a in answers]  # ignore_eos: exactly n_new tokens per prompt

        configs = {"loop (model.generate per prompt)": loop,
                   **{f"runner batch {b}": (lambda ps, b=b: runner(b, ps)) for b in BATCH_SIZES}}
        for run in configs.values():  # warm-up: kernels, allocator, tokenizer caches
            run(prompts[:2])
        seconds: dict[str, list[float]] = {name: [] for name in configs}
        tokens: dict[str, int] = {}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeat):
            for name, run in configs.items():
                sync()
                start = time.perf_counter()
                tokens[name], texts[name] = run(prompts)
                sync()
                seconds[name].append(time.perf_counter() - start)

    names = list(configs)
    rates = {name: tokens[name] / statistics.median(seconds[name]) for name in names}
    base = rates[names[0]]
    print(f"model: Llama, {parameters / 1e6:.1f}M parameters, {dtype}, on {device}; {len(prompts)} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens, {n_new} new tokens each (eos ignored), greedy; "
          f"median of {args.repeat} runs")
    print(f"{'configuration':<34} {'median s':>9} {'tokens':>7} {'tokens/s':>10} {'speedup':>8}  same text as loop")
    for name in names:
        same = sum(a == b for a, b in zip(texts[name], texts[names[0]]))
        print(f"{name:<34} {statistics.median(seconds[name]):>9.2f} {tokens[name]:>7} {rates[name]:>10.1f} "
              f"{rates[name] / base:>7.2f}x  {same}/{len(prompts)}")
    speedup = rates[f"runner batch {max(BATCH_SIZES)}"] / base
    verdict = "met" if speedup >= TARGET else "NOT met"
    print(f"target >= {TARGET:.0f}x at batch {max(BATCH_SIZES)}: {verdict} ({speedup:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device, "dtype": str(dtype), "parameters": parameters, "prompts": len(prompts),
            "max_new_tokens": n_new, "repeat": args.repeat,
            "results": {name: {"seconds": seconds[name], "tokens": tokens[name], "tokens_per_s": rates[name],
                               "speedup": rates[name] / base} for name in names},
        }, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
