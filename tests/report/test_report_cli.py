"""``mergeplug report``: writes beside the results by default and prints the main table; a missing or broken
results file is a one-line error with exit code 2."""
from __future__ import annotations

from click.testing import CliRunner

from mergeplug.cli import cli


def test_report_command_writes_beside_the_results_and_prints_the_table(results_file, quiet_registry):
    result = CliRunner().invoke(cli, ["report", str(results_file)])
    assert result.exit_code == 0, result.output
    folder = results_file.parent / "report"
    assert (folder / "report.md").is_file() and (folder / "report.html").is_file()
    lines = result.output.splitlines()
    assert lines[0] == "base alpha:"
    assert lines[1].startswith("| model | role | method | arith | code | general (base ability) | normalised (mean) |")
    assert lines[-1] == f"wrote {folder / 'report.md'}, {folder / 'report.html'} and 4 plot(s) in {folder}"


def test_report_command_output_option_and_folder_argument(results_file, quiet_registry, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(results_file.parent), "-o", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "scores_general.png").is_file()


def test_missing_or_broken_results_are_one_line_errors(tmp_path, quiet_registry):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: results {tmp_path / 'nope.jsonl'}: no such file; give a bench's results.jsonl or the bench folder "
        "(mergeplug bench -o DIR)"]
    broken = tmp_path / "results.jsonl"
    broken.write_text('{"type": "step", "id": "a", "kind": "merge", "status": "ok"}\n{oops}\n\n')
    result = CliRunner().invoke(cli, ["report", str(broken)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {broken} line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert not (tmp_path / "report").exists()
