"""The ``bench`` command (kept apart from cli.py: it only imports click until it runs)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from .errors import MergeplugError


def preset_names() -> list[str]:
    folder = resources.files("mergeplug.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(recipe: str) -> Path:
    """A recipe file, or the name of a shipped preset."""
    path = Path(recipe)
    if path.is_file():
        return path
    if recipe in preset_names():
        return Path(str(resources.files("mergeplug.presets") / f"{recipe}.yaml"))
    if path.suffix in (".yaml", ".yml", ".json") or "/" in recipe:
        raise MergeplugError(f"{recipe}: no such recipe file")
    raise MergeplugError(f"{recipe}: neither a recipe file nor a preset; presets: {', '.join(preset_names())}")


def _format(summary: dict) -> str:
    parts = [f"{summary['steps']} steps", f"{summary['ran']} run now", f"{summary['ok']} ok"]
    if summary["failed"]:
        parts.append(f"{summary['failed']} failed")
    if summary["skipped"]:
        parts.append(f"{summary['skipped']} skipped")
    return ", ".join(parts)


@click.command("bench")
@click.argument("recipe")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="The bench folder: steps, results.jsonl, results.csv, report/. A rerun reuses finished steps.")
@click.option("--executor", default=None, help="Override the recipe's executor (`mergeplug list --kind executor`).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Worker processes of the local executor (0: in this process).")
@click.option("--ray-address", default=None, help="Run on this Ray cluster (implies --executor ray).")
@click.option("--base", "bases", multiple=True, metavar="LABEL",
              help="Only the base model(s) with this label (repeatable), e.g. --base llama-3.2-3b.")
@click.option("--no-report", is_flag=True, help="Write results only, no report.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def bench_command(recipe, output, executor, workers, ray_address, bases, no_report, quiet):
    """Run the MergeBench protocol: finetune specialists, merge with every method, evaluate all, report.

    RECIPE is a bench recipe file or a shipped preset: tiny, or mergebench (MergeBench's four base models,
    five domains, methods and grids; needs GPUs and the hub; --base picks one of them).
    `mergeplug bench tiny -o DIR` runs the whole protocol on models and data made here, in minutes.
    """
    from .bench import bench

    path = resolve_recipe(recipe)
    parameters: dict = {}
    if ray_address:
        executor = executor or "ray"
        parameters["address"] = ray_address
    if workers is not None:
        if executor not in (None, "local"):
            raise MergeplugError("--workers is an option of the local executor; drop it or use --executor local")
        executor = "local"
        parameters["workers"] = workers
    summary = bench(path, output, executor=executor, executor_parameters=parameters, bases=bases,
                    progress=not quiet,
                    report=not no_report)
    click.echo(f"bench: {_format(summary)}; results in {Path(output) / 'results.jsonl'}")
    if summary.get("report"):
        click.echo(f"report: {summary['report']}")
