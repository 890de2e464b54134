"""Time and peak memory of the statistics pass of data-aware mergers, and of RegMean against task arithmetic
(issue 7).

Builds a small Llama (hidden 256, 4 blocks, the tiny BPE tokenizer of vocabulary 2048: about 4M parameters), a
base and two "finetunes" (base + noise), and N rows of instruction/response text per model (local JSONL, the
same row shapes as MergeBench's validation sets), then measures, each in a fresh subprocess with an empty
statistics cache:

- the statistics pass of ``fisher`` (diagonal Fisher: one forward and backward pass per sample) and of
  ``regmean`` (input Gram matrices of every linear layer: one forward pass per sample with hooks), per 1000
  samples and model;
- a ``regmean`` merge with its statistics cached, against a ``task_arithmetic`` merge of the same models.

Wall time, and peak resident memory (VmHWM of /proc/self/status: it includes the interpreter and torch).

    python benchmarks/statistics_speed.py [--samples 200] [--folder /tmp/mergeplug-statistics-bench]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

MODELS = 2
WORDS = ("the value of a sum is found by adding each term in order and the answer is written at the end of "
         "a short explanation that names every step of the work").split()


def build(folder: Path, samples: int) -> None:
    from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

    if (folder / "ready").is_file() and json.loads((folder / "ready").read_text()) == {"samples": samples}:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenizer = train_tiny_tokenizer(folder / "tokenizer", vocab_size=2048)
    make_tiny_model(folder / "base", "llama", seed=0, num_layers=4, hidden=256, vocab_size=2048,
                    tokenizer_folder=tokenizer, intermediate=688, heads=8, kv_heads=4, max_position_embeddings=256)
    rng = random.Random(0)
    for i in range(1, MODELS + 1):
        make_tiny_model(folder / f"ft{i}", base=folder / "base", seed=i, noise=0.002, vocab_size=2048,
                        tokenizer_folder=tokenizer)
        with open(folder / f"data{i}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(samples):
                row = {"instruction": " ".join(rng.choices(WORDS, k=24)), "response": " ".join(rng.choices(WORDS, k=40))}
                handle.write(json.dumps(row) + "\n")
    (folder / "ready").write_text(json.dumps({"samples": samples}))


def recipe(folder: Path, method: str, samples: int) -> dict:
    models = [{"model": str(folder / f"ft{i}"), "data": {"data_files": str(folder / f"data{i}.jsonl")}}
              for i in range(1, MODELS + 1)]
    parameters = {"samples": samples, "max_length": 128} if method in ("fisher", "regmean") else {"lambda": 1.0}
    return {"method": method, "base_model": str(folder / "base"), "models": models, "parameters": parameters}


CHILD = textwrap.dedent('''
    import json, sys, time
    from mergeplug.engine import compute_statistics, plan_merge, merge
    from mergeplug.recipe import check_recipe

    spec = json.loads(sys.argv[1])
    recipe = check_recipe(spec["recipe"], source="bench")
    started = time.perf_counter()
    if spec["what"] == "statistics":
        compute_statistics(plan_merge(recipe, device="cpu"))
    else:
        merge(recipe, spec["out"], force=True, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))
''')


def measure(spec: dict, cache: Path) -> dict:
    env = {"MERGEPLUG_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    import os

    env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="rows per model (figures are scaled to 1000)")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mergeplug-statistics-bench"))
    args = parser.parse_args()
    started = time.time()
    build(args.folder, args.samples)
    print(f"models: Llama hidden 256, 4 blocks, vocab 2048 (base + {MODELS} finetunes); {args.samples} samples "
          f"per model (build {time.time() - started:.1f} s)")
    rows = []
    for method in ("fisher", "regmean"):
        cache = args.folder / f"cache-{method}"
        shutil.rmtree(cache, ignore_errors=True)
        got = measure({"what": "statistics", "recipe": recipe(args.folder, method, args.samples)}, cache)
        per_1000 = got["seconds"] / (args.samples * MODELS) * 1000
        rows.append((f"{method} statistics pass", got["seconds"], f"{per_1000:.1f} s per 1000 samples", got["peak_mib"]))
    merged = {}
    for method, cache in (("task_arithmetic", args.folder / "cache-none"), ("regmean", args.folder / "cache-regmean")):
        got = measure({"what": "merge", "recipe": recipe(args.folder, method, args.samples),
                       "out": str(args.folder / f"out-{method}")}, cache)
        merged[method] = got
        note = "statistics cached" if method == "regmean" else ""
        rows.append((f"{method} merge", got["seconds"], note, got["peak_mib"]))
    ratio = merged["regmean"]["seconds"] / merged["task_arithmetic"]["seconds"]
    print(f"{'step':<28} {'seconds':>8}  {'peak MiB':>9}  note")
    for name, seconds, note, peak in rows:
        print(f"{name:<28} {seconds:>8.2f}  {peak:>9.0f}  {note}")
    print(f"regmean merge / task_arithmetic merge: {ratio:.2f}x time, "
          f"{merged['regmean']['peak_mib'] - merged['task_arithmetic']['peak_mib']:+.0f} MiB peak")


if __name__ == "__main__":
    main()
