"""Seconds each installed merger takes on one embedding-sized tensor (default 32000x1024, float32) with a base
and three models, next to a plain average of the models: the merge method's own cost, without I/O.

    python benchmarks/merger_tensor_speed.py [--rows 32000] [--cols 1024] [--models 3] [--repeat 3]

Each merger runs at its defaults (localize_stitch with scope: tensor, as the whole-model scope needs the
engine's pre-pass); the median of --repeat runs is printed.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch

    from mergeplug.merging import TensorInputs
    from mergeplug.plugins import Registry
    from mergeplug.schema import defaults

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=gen)
    models = [base + 0.01 * torch.randn(args.rows, args.cols, generator=gen) for _ in range(args.models)]

    def timed(run) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(f"{'merger':<18} {'median s':>9}   ({args.rows}x{args.cols} float32, base + {args.models} models)")
    print(f"{'(plain average)':<18} {timed(lambda: sum(models) / len(models)):>9.3f}")
    registry = Registry()
    for component in registry.components("merger"):
        cls = component.load()
        params = defaults(component.parameters)
        if "scope" in params:
            params["scope"] = "tensor"
        per_model = defaults(component.model_parameters or {"properties": {}})
        chosen = models[:1] if component.name == "slerp" else models
        inputs = TensorInputs("model.embed_tokens.weight", base, chosen, params, [dict(per_model) for _ in chosen])
        merger = cls(params)
        print(f"{component.name:<18} {timed(lambda: merger.merge(inputs)):>9.3f}")


if __name__ == "__main__":
    main()
