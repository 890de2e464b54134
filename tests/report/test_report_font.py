"""The 3x5 font: every character the report's labels use has its own glyph, a character outside the font is
drawn as a filled box (never a crash), and text turned upwards is the same glyphs rotated a quarter left."""
from __future__ import annotations

import string

from mergeplug.plotting import (ADVANCE, BLACK, FONT, SCALE, TEXT_HEIGHT, UNKNOWN_GLYPH, WHITE, Canvas,
                                grouped_bar_chart, text_width)
from mergeplug.report import compute, load_results

LABEL_CHARACTERS = string.ascii_letters + string.digits + "_-.:/%()=,+ "


def lit(canvas: Canvas) -> set[tuple[int, int]]:
    return {(x, y) for y in range(canvas.height) for x in range(canvas.width) if canvas.get(x, y) != WHITE}


def glyph_pixels(rows, x0=0, y0=0) -> set[tuple[int, int]]:
    """The screen pixels a glyph's rows light at (x0, y0), each font pixel SCALE x SCALE."""
    return {(x0 + col * SCALE + dx, y0 + row * SCALE + dy) for row, bits in enumerate(rows) for col in range(3)
            if bits & (4 >> col) for dx in range(SCALE) for dy in range(SCALE)}


def test_every_label_character_has_its_own_glyph():
    assert set(LABEL_CHARACTERS) <= set(FONT)
    shapes = [FONT[c] for c in LABEL_CHARACTERS if c != " "]
    assert len(set(shapes)) == len(shapes), "no two characters look the same"
    assert UNKNOWN_GLYPH not in shapes
    assert all(len(rows) == 5 and all(0 <= bits <= 7 for bits in rows) for rows in FONT.values())


def test_text_draws_exactly_the_glyphs_and_unknown_characters_as_boxes():
    canvas = Canvas(200, 20)
    canvas.text(3, 4, "Ab=é")
    expected = (glyph_pixels(FONT["A"], 3, 4) | glyph_pixels(FONT["b"], 3 + ADVANCE, 4)
                | glyph_pixels(FONT["="], 3 + 2 * ADVANCE, 4) | glyph_pixels(UNKNOWN_GLYPH, 3 + 3 * ADVANCE, 4))
    assert lit(canvas) == expected
    assert all(canvas.get(x, y) == BLACK for x, y in expected)
    assert text_width("Ab=é") == 4 * ADVANCE - SCALE


def test_text_up_is_the_glyph_turned_a_quarter_left():
    flat, up = Canvas(40, 40), Canvas(40, 40)
    flat.text(0, 0, "F")
    up.text_up(10, 30, "F")
    # a pixel (x, y) of the flat glyph lands at (10 + y, 30 - x): the glyph's top faces left, text reads upwards
    assert lit(up) == {(10 + y, 30 - x) for x, y in lit(flat)}
    assert max(x for x, _ in lit(up)) < 10 + TEXT_HEIGHT


def test_the_reports_labels_render_and_odd_labels_do_not_crash(results_file, tmp_path):
    summary = compute(load_results(results_file))
    used = {c for m in summary["models"] for c in m["label"] + str(m["method"])}
    used |= {c for d in summary["domains"] for c in d["name"]}
    assert used <= set(FONT)
    plot = grouped_bar_chart([("grüne Basis λ", [("modèle—1 ✓", 0.5, "σ"), ("", None, "σ")])], tmp_path / "odd.png",
                             title="titre 😀", y_label="score")
    assert plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m.label for m in plot.marks] == ["modèle—1 ✓", ""]
