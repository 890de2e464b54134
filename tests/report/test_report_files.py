"""The written report: the files, the best value per column marked (bold in Markdown, a highlighted cell in
HTML), the HTML self-contained with every PNG embedded as a data URI, and the PNGs valid with bars and points
drawn in their colours where the values put them."""
from __future__ import annotations

import base64
import re

from mergeplug.report import ROLE_COLOURS, SCATTER_FILE, Cell, Table, write_report

from .conftest import MODELS, score_rows, step_rows, write_lines


def pixel(rows, x, y):
    return tuple(rows[y][3 * x:3 * x + 3])


def test_best_per_column_highest_or_lowest_ties_and_lone_values():
    table = Table(["name", "score", "forgetting", "lone"], [
        [Cell("a"), Cell("0.5", 0.5), Cell("0.1", 0.1), Cell("1", 1.0)],
        [Cell("b"), Cell("0.9", 0.9), Cell("0.3", 0.3), Cell("–")],
        [Cell("c"), Cell("0.9", 0.9), Cell("–"), Cell("–")],
        [Cell("d"), Cell("1.0 *"), Cell("-0.2", -0.2), Cell("–")],  # an unranked cell (number None)
    ], [None, "high", "low", "high"])
    # ties are all best; the lowest wins for forgetting; a column with a single value is not ranked
    assert table.best() == {(1, 1), (2, 1), (3, 2)}
    same = Table(["score"], [[Cell("0", 0.0)], [Cell("0", 0.0)]], ["high"])
    assert same.best() == set(), "a column whose values are all equal has no best"


def test_report_marks_the_best_in_markdown_and_html(results_file):
    written = write_report(results_file, results_file.parent / "report")
    markdown = written.markdown.read_text()
    # Every merge (base alpha): ties has the best complete mean (0.775); dare's 0.875 covers 1 of 2 domains.
    assert "| ties density=0.2 | ties | density=0.2, scaling=1.0 | 0.750 | 0.800 | **0.775** | 2/2 |" in markdown
    assert "| dare p=0.9 | dare | p=0.9 | **0.875** | – | 0.875 * | 1/2 |" in markdown
    # Forgetting: the lowest is best; merge cost: the lowest seconds and memory are best.
    assert "| linear weight=0.5 | merged | 0.125 | 0.050 | 2 |" in markdown
    assert "| dare p=0.9 | merged | **0.000** | **0.000** | 2 |" in markdown
    assert "| linear weight=0.5 | linear | **0.50** | **80** | **3.00** |" in markdown
    # the main table: the arith specialist has the best arith score under base alpha
    assert "| alpha/arith | specialist | full | **0.800** | 0.100 | 0.500 | 0.600 | 0.125 |" in markdown
    page = written.html.read_text()
    assert '<td class="num best">0.775</td>' in page
    assert '<td class="num">0.875 *</td>' in page
    assert "RuntimeError: shapes differ at tensor model.layers.0.mlp.up_proj.weight" in markdown
    assert "| evaluate | evaluate broken | skipped | needs failed step merge-broken-a |" in markdown
    assert "- model dare p=0.9 (base alpha): no score for code;" in markdown


def test_files_and_self_contained_html(results_file, decode_png):
    out = results_file.parent / "report"
    written = write_report(results_file.parent, out)
    names = ["scores_arith.png", "scores_code.png", "scores_general.png", SCATTER_FILE]
    assert list(written.plots) == names
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "report.html", "report.json", "report.md"])
    page = written.html.read_text()
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(data) for data in embedded] == [(out / name).read_bytes() for name in names]
    assert "<style>" in page and "<script" not in page
    assert not re.search(r'(src|href)="(?!data:)', page), "nothing is loaded from outside the page"
    for name in names:
        assert f"]({name})" in written.markdown.read_text()
        width, height, _ = decode_png((out / name).read_bytes())
        assert width >= 360 and height >= 300


def test_bars_and_points_where_the_values_put_them(results_file, decode_png):
    written = write_report(results_file, results_file.parent / "report")
    plot = written.plots["scores_arith.png"]
    width, height, rows = decode_png(plot.path.read_bytes())
    left, top, right, bottom = plot.area
    assert right < width and bottom < height
    bars = {(m.group, m.label): m for m in plot.marks}
    assert len(plot.marks) == 11  # every model of both bases
    ties = bars[("alpha", "ties density=0.2")]
    x = (ties.box[0] + ties.box[2]) // 2
    assert pixel(rows, x, bottom - 1) == ROLE_COLOURS["merged"]  # a bar stands on the axis
    assert pixel(rows, x, ties.box[1]) == ROLE_COLOURS["merged"]  # up to its value
    assert pixel(rows, x, ties.box[1] - 1) != ROLE_COLOURS["merged"]
    base = bars[("alpha", "alpha")]
    assert pixel(rows, (base.box[0] + base.box[2]) // 2, bottom - 1) == ROLE_COLOURS["base"]
    # heights are proportional to the scores: 0.6 against the arith specialist's 0.8 and the base's 0.2
    special = bars[("alpha", "alpha/arith")]
    height_of = lambda m: m.box[3] - m.box[1] + 1  # noqa: E731
    assert abs(height_of(ties) / height_of(special) - 0.6 / 0.8) < 0.02
    assert abs(height_of(base) / height_of(special) - 0.2 / 0.8) < 0.02
    assert pixel(rows, (special.box[0] + special.box[2]) // 2, special.box[1] + 1) == ROLE_COLOURS["specialist"]
    # the missing code score of dare draws no bar in the code chart
    code = written.plots["scores_code.png"]
    _, _, code_rows = decode_png(code.path.read_bytes())
    (dare,) = [m for m in code.marks if m.label == "dare p=0.9"]
    assert dare.value is None
    assert pixel(code_rows, dare.box[0] + 1, code.area[3] - 1) not in ROLE_COLOURS.values()

    scatter = written.plots[SCATTER_FILE]
    _, _, scatter_rows = decode_png(scatter.path.read_bytes())
    assert [m.label for m in scatter.marks] == ["ties density=0.2 (alpha)", "linear weight=0.5 (alpha)",
                                                 "ties density=0.2 (beta)"], "dare's partial mean is not plotted"
    for mark in scatter.marks:
        cx, cy = (mark.box[0] + mark.box[2]) // 2, (mark.box[1] + mark.box[3]) // 2
        assert pixel(scatter_rows, cx, cy) == scatter.colours[mark.series]
    ties_a, linear_a, ties_b = scatter.marks
    assert linear_a.box[0] < ties_a.box[0] < ties_b.box[0], "x: merge seconds 0.5 < 2.0 < 3.0"
    assert ties_a.box[1] < linear_a.box[1], "y: normalised mean 0.775 above 0.75"
    assert ties_b.box[1] == linear_a.box[1], "both at 0.75"


def test_no_base_ability_and_no_merge_cost(tmp_path):
    domains = {"arith": "capability", "code": "capability"}
    steps = [s for s in step_rows() if s["kind"] != "merge"]
    path = write_lines(tmp_path / "results.jsonl", [*steps, *score_rows(MODELS, domains)])
    written = write_report(path, tmp_path / "out")
    markdown = written.markdown.read_text()
    assert "Forgetting: n/a: no base_ability domain was evaluated" in markdown
    assert "forgetting (relative)" not in markdown
    assert SCATTER_FILE not in written.plots and "No scatter of normalised performance" in markdown
    assert "model ties density=0.2 (base alpha): no merge step names it" in markdown
    assert sorted(written.plots) == ["scores_arith.png", "scores_code.png"]
