"""The ``mergeplug tune`` command. Only click is imported here: the search loads torch when it runs."""
from __future__ import annotations

import click


@click.command("tune")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Folder for trials.jsonl, trials.md, best_recipe.yaml and tune.json; rerunning into it resumes.")
@click.option("--force", is_flag=True,
              help="Discard the trials recorded in OUTPUT when the merge recipe or objective changed since.")
@click.option("--device", default=None,
              help="Where to merge and score: auto, cpu, cuda, cuda:N or mps. [default: the recipe's, else auto]")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Validation rows per domain (benchmark samples with measure: benchmarks). "
                   "[default: the recipe's, else 200]")
@click.option("--keep", is_flag=True, help="Keep the best merged model as OUTPUT/best_model.")
@click.option("--retry-failed", is_flag=True, help="Run again the trials recorded as failed.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
def tune_command(recipe, output, force, device, limit, keep, retry_failed, quiet):
    """Search the merging coefficients of a tune RECIPE for the best mean normalised performance.

    Each trial merges with one point of the recipe's search space, scores the merged model on every model's
    domain and divides by that domain's specialist's score (MergeBench, arXiv:2505.10833). Trials are
    recorded as they finish; an interrupted search resumes where it stopped.
    """
    from .errors import MergeplugError
    from .tuning import tune

    result = tune(recipe, output, force=force, device=device, limit=limit, keep=keep, retry_failed=retry_failed,
                  progress=False if quiet else None)
    if result.best is None:
        failed = [t for t in result.trials if t.status == "failed"]
        first = failed[0].error if failed else "the strategy proposed no point"
        raise MergeplugError(f"tune: no trial succeeded ({len(failed)} failed; first: {first}); see {output}/trials.md")
    if not quiet:
        click.echo(result.table)
    best = result.best
    click.echo(f"best: objective {best.objective:.4f} at {', '.join(f'{k}={v}' for k, v in best.parameters.items())} "
               f"(trial {best.number}; {result.ran} run now, {len(result.trials)} recorded)")
    click.echo(f"wrote {result.out / 'best_recipe.yaml'}" + (f" and {result.out / 'best_model'}" if keep else ""))
