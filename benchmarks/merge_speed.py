"""Merge speed and peak memory of every installed merger against a streaming floor (issue 3).

Builds a base and three "finetunes" (base + N(0, 0.002) noise) of a ~370M-parameter Llama in bf16 (hidden
1024, intermediate 2816, vocab 32000, 24 blocks; a 12-block variant shows that memory does not grow with
depth), then measures, each in a fresh subprocess:

- the floor: read every input tensor once, average in float32, cast to bf16 and write (the least any merge
  must do, through the same reader and writer);
- ``mergeplug``'s engine with every installed merger at its defaults.

Wall time, and peak resident memory (VmHWM of /proc/self/status, which includes the interpreter and torch).
Targets: linear / task_arithmetic <= 1.3x the floor; ties, dare, breadcrumbs, della, sce, consensus_ta
<= 2x; peak RSS <= floor + 1 GiB and not growing with depth.

Each method (the floor too) is measured ``--repeat`` times, interleaved, each from the same page-cache state
(``--cache warm``, the default: inputs read once before; ``cold``: dropped from the cache), and the table
shows the median time against the floor's median, the fastest against the floor's fastest, and the highest
peak: on a shared 2-core machine a single run can be off by 2x.

    python benchmarks/merge_speed.py [--folder /tmp/mergeplug-bench] [--methods linear,ties] [--depths 24,12]
                                     [--repeat 3] [--cache warm|cold]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

SIZES = dict(hidden=1024, intermediate=2816, vocab_size=32000, heads=16, kv_heads=16)
FINETUNES = 3
TARGETS = {"linear": 1.3, "task_arithmetic": 1.3, "ties": 2.0, "dare_ties": 2.0, "dare_linear": 2.0,
           "breadcrumbs": 2.0, "breadcrumbs_ties": 2.0, "della": 2.0, "della_linear": 2.0, "sce": 2.0,
           "consensus_ta": 2.0}


def build(folder: Path, num_layers: int) -> dict[str, Path]:
    """Write base and finetunes tensor by tensor (never a whole model in memory); reused when present."""
    import torch

    from mergeplug.checkpoint import ShardedWriter
    from mergeplug.testing import tiny_config

    paths = {"base": folder / "base", **{f"ft{i}": folder / f"ft{i}" for i in range(1, FINETUNES + 1)}}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    config = tiny_config("llama", num_layers=num_layers, hidden=SIZES["hidden"], vocab_size=SIZES["vocab_size"],
                         intermediate=SIZES["intermediate"], heads=SIZES["heads"], kv_heads=SIZES["kv_heads"])
    config.dtype = torch.bfloat16
    h, m, v = SIZES["hidden"], SIZES["intermediate"], SIZES["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m)})
    for role, path in paths.items():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        config.save_pretrained(path)
        writer = ShardedWriter(path, [(n, s, "bfloat16") for n, s in shapes.items()], 2 * 10**9)
        for name in writer.order:
            base = torch.randn(shapes[name], generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.02
            if role != "base":
                base += 0.002 * torch.randn(shapes[name], generator=torch.Generator().manual_seed(zlib.crc32(f"{name}/{role}".encode())))
            writer.write(name, base.to(torch.bfloat16))
        writer.close()
    return paths


def floor(paths: dict[str, Path], out: Path) -> None:
    """Read each input tensor once, average in float32, write bf16: the streaming floor."""
    import torch

    from mergeplug.checkpoint import Checkpoint, ShardedWriter

    inputs = [Checkpoint(p, label=k) for k, p in paths.items()]
    ref = inputs[0]
    out.mkdir(parents=True)
    writer = ShardedWriter(out, [(n, ref.tensors[n].shape, "bfloat16") for n in ref.read_order()], 5 * 10**9)
    for name in writer.order:
        total = torch.zeros(ref.tensors[name].shape, dtype=torch.float32)
        for checkpoint in inputs:
            total.add_(checkpoint.get(name).to(torch.float32))
        writer.write(name, total.div_(len(inputs)).to(torch.bfloat16))
        del total
    writer.close()


def set_page_cache(folder: Path, state: str) -> None:
    """Put every input file in the page cache (warm: a merge of models just written or read) or out of it
    (cold: a merge of models on disk), so that each measurement starts from the same state. Left alone, this
    VM drops part of the cache between runs, and the floor (mostly reading) moved 1-3.5 s from run to run.
    The previous run's output is flushed first, so its writeback does not land in the next measurement."""
    os.sync()
    for path in sorted(folder.glob("*/*.safetensors")):
        with open(path, "rb") as fh:
            if state == "cold":
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while fh.read(1 << 24):
                    pass


def measure(method: str, folder: Path) -> None:
    """One measurement, in this (fresh) process; prints a JSON line with seconds and peak RSS."""
    import yaml

    paths = {k: folder / k for k in ["base", *(f"ft{i}" for i in range(1, FINETUNES + 1))]}
    out = folder / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    import torch  # noqa: F401 - imported before the clock starts, as the floor's is

    from mergeplug.engine import merge

    start = time.perf_counter()
    if method == "floor":
        floor(paths, out)
    else:
        models = [paths["ft1"]] if method == "slerp" else [paths[f"ft{i}"] for i in range(1, FINETUNES + 1)]
        recipe = folder / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump({"method": method, "base_model": str(paths["base"]),
                                          "models": [{"model": str(p)} for p in models]}))
        merge(recipe, out, progress=False)
    seconds = time.perf_counter() - start
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mib": hwm / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mergeplug-bench"))
    parser.add_argument("--methods", default=None, help="Comma-separated mergers (default: every installed one).")
    parser.add_argument("--depths", default="24,12", help="Block counts to build and measure.")
    parser.add_argument("--shallow-methods", default="linear,ties,dare_ties",
                        help="Mergers also measured on the shallower models (memory vs depth).")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm",
                        help="Inputs in the page cache before each measurement (warm, default) or dropped from it.")
    parser.add_argument("--repeat", type=int, default=3, help="Measurements per method, interleaved (median shown).")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.folder)
        return
    from mergeplug.plugins import Registry

    methods = args.methods.split(",") if args.methods else Registry().names("merger")
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    for i, depth in enumerate(depths):
        folder = args.folder / f"layers{depth}"
        build(folder, depth)
        chosen = methods if i == 0 else [m for m in args.shallow_methods.split(",") if m in methods]
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits every method alike
            for method in ["floor", *chosen]:
                set_page_cache(folder, args.cache)
                run = subprocess.run([sys.executable, __file__, "--measure", method, "--folder", str(folder)],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    rows.append({"depth": depth, "method": method,
                                 "error": (run.stderr.strip().splitlines() or ["?"])[-1]})
                else:
                    rows.append({"depth": depth, **json.loads(run.stdout.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'blocks':>6} {'method':<18} {'median s':>9} {'min-max s':>12} {'x floor':>8} {'(fastest)':>9}"
          f" {'target':>7} {'peak RSS MiB':>13} {'RSS - floor':>12}")
    for depth in depths:
        summary = {}
        for r in (r for r in rows if r["depth"] == depth):
            summary.setdefault(r["method"], []).append(r)
        ok = {m: [r for r in runs if "error" not in r] for m, runs in summary.items()}
        floor_s = statistics.median(r["seconds"] for r in ok["floor"]) if ok.get("floor") else float("nan")
        floor_min = min(r["seconds"] for r in ok["floor"]) if ok.get("floor") else float("nan")
        floor_rss = max((r["peak_rss_mib"] for r in ok.get("floor", [])), default=0.0)
        for method, runs in summary.items():
            if not ok[method]:
                print(f"{depth:>6} {method:<18} ERROR {runs[0]['error']}")
                continue
            times = [r["seconds"] for r in ok[method]]
            median, rss = statistics.median(times), max(r["peak_rss_mib"] for r in ok[method])
            ratio = median / floor_s
            target = TARGETS.get(method)
            flag = "" if target is None or ratio <= target else " !"
            spread = f"{min(times):.2f}-{max(times):.2f}"
            print(f"{depth:>6} {method:<18} {median:>9.2f} {spread:>12} {ratio:>8.2f} {min(times) / floor_min:>9.2f}"
                  f" {(f'{target:.1f}' if target else '-'):>7} {rss:>13.0f} {rss - floor_rss:>+12.0f}{flag}")


if __name__ == "__main__":
    main()
