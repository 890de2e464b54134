"""``mergeplug report RESULTS``: a bench's results as a Markdown report, an HTML page and PNG plots.

Only click is imported at module level: the work (and the plotting) is imported when the command runs.
"""
from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("results")
@click.option("-o", "--output", "output", default=None, type=click.Path(file_okay=False),
              help="Folder to write the report to. [default: RESULTS' folder / report]")
def report_command(results, output):
    """Write report.md, a self-contained report.html and PNG plots for RESULTS (a bench's results.jsonl or the
    bench folder), then print the per-domain score table.

    Normalised performance, forgetting and merge cost are computed as MergeBench defines them
    (arXiv:2505.10833); the best value of each column is highlighted.
    """
    from .report import load_results, main_table, write_report

    loaded = load_results(results)
    out = Path(output) if output else loaded.source.parent / "report"
    written = write_report(loaded, out)
    click.echo(main_table(written.summary))
    click.echo(f"wrote {written.markdown}, {written.html} and {len(written.plots)} plot(s) in {written.folder}")
