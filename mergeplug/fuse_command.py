"""The ``mergeplug fuse`` command. Only click is imported here: the pipeline loads torch when it runs."""
from __future__ import annotations

import click


@click.command("fuse")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Folder of the fused model (written once complete, with its model card).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new model is complete).")
@click.option("--device", default=None,
              help="Where every step computes: auto, cpu, cuda or mps. [default: the recipe's, else auto]")
@click.option("--work", default=None, type=click.Path(file_okay=False),
              help="Folder of the steps' outputs (stores, targets, target models), reused by a rerun. "
                   "[default: OUTPUT.fuse-work beside OUTPUT]")
@click.option("--quiet", is_flag=True, help="No progress display.")
def fuse_command(recipe, output, force, device, work, quiet):
    """Fuse the source models of a fuse RECIPE into its pivot (FuseChat, arXiv:2402.16107).

    Four steps, each reused when its output is already in the work folder: record every model's top-k
    next-token distributions on the corpus; align each source to the pivot (token aligner plugin); finetune
    the pivot against each source's fused targets; merge the target models (VaRM or SCE) into OUTPUT.

    Under torchrun or accelerate launch the main process records, aligns and merges, and every process
    trains each target model, data parallel.
    """
    from .fusion import Processes, fuse

    out = fuse(recipe, output, force=force, device=device, work=work, progress=not quiet)
    if Processes.from_environment().main:  # the main process reports, once
        click.echo(f"wrote {out}")
