"""How long `mergeplug list`, `mergeplug --help` and `mergeplug --version` take, wall clock, and which heavy
libraries they import. Target (issue 2): under 0.5 s, and none of torch, transformers, datasets.

    python benchmarks/cli_startup.py [--runs 10]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "datasets", "safetensors", "jsonschema")
PROBE = (
    "import sys\nfrom mergeplug.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    "print('HEAVY', sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"{'command':<28} {'median s':>9} {'max s':>7}  heavy imports")
    for argv in (["list"], ["list", "--json"], ["--help"], ["--version"], ["show", "linear"]):
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(["mergeplug", *argv], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        probe = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)],
                               capture_output=True, text=True)
        heavy = next((l.split(" ", 1)[1] for l in probe.stderr.splitlines() if l.startswith("HEAVY")), "?")
        print(f"{'mergeplug ' + ' '.join(argv):<28} {statistics.median(times):>9.3f} {max(times):>7.3f}  {heavy}")


if __name__ == "__main__":
    main()
