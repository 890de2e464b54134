"""`mergeplug show` on a domain and an evaluator tells what a run will measure."""
from click.testing import CliRunner

from mergeplug.cli import cli


def test_show_a_domain_lists_its_benchmarks_and_training_sets():
    result = CliRunner().invoke(cli, ["show", "math", "--kind", "domain"])
    assert result.exit_code == 0, result.output
    assert "  gsm8k: openai/gsm8k [test], evaluator exact_match, headline exact_match_last_number" in result.output
    assert "training: AI-MO/NuminaMath-TIR [train]" in result.output
    assert "role: capability" in result.output


def test_show_an_evaluator_lists_its_metrics_and_fields():
    result = CliRunner().invoke(cli, ["show", "exact_match"])
    assert result.exit_code == 0, result.output
    assert "metrics (default parameters; headline first): exact_match_gsm8k, exact_match_last_number" in result.output
    assert "sample fields it reads: answer" in result.output
    assert "extract" in result.output  # its parameters follow
