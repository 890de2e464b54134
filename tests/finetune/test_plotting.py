"""The PNG loss curve: a valid PNG (decoded with zlib by the decode_png fixture), the size asked for, axes and
curve where they belong."""
from __future__ import annotations

import pytest

from mergeplug.plotting import (BLACK, BLUE, MARGIN_BOTTOM, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, WHITE, line_plot,
                                tick_label)


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][3 * x:3 * x + 3])


def test_curve_axes_and_background(tmp_path, decode_png):
    path = line_plot([1, 2, 3], [4.0, 2.0, 1.0], tmp_path / "loss.png", width=200, height=120)
    width, height, rows = decode_png(path.read_bytes())
    assert (width, height) == (200, 120)
    left, right, top, bottom = MARGIN_LEFT, 200 - MARGIN_RIGHT - 1, MARGIN_TOP, 120 - MARGIN_BOTTOM - 1
    assert pixel(rows, width - 1, height - 1) == WHITE
    assert pixel(rows, left, (top + bottom) // 2) == BLACK  # y axis
    assert pixel(rows, (left + right) // 2 + 3, bottom) == BLACK  # x axis
    # first point (1, 4.0): top left of the plotting area; last (3, 1.0): bottom right; the middle (2, 2.0)
    assert pixel(rows, left, top) == BLUE and pixel(rows, right, bottom) == BLUE  # drawn over the axes
    middle_y = bottom - round((2.0 - 1.0) / 3.0 * (bottom - top))
    assert pixel(rows, (left + right) // 2, middle_y) == BLUE
    assert sum(row.count(bytes(BLUE)) for row in rows) > right - left  # a connected polyline, two pixels thick


def test_nan_points_are_left_out_and_empty_data_gives_axes(tmp_path, decode_png):
    path = line_plot([1, 2, 3], [float("nan"), 2.0, 2.0], tmp_path / "flat.png", width=100, height=80)
    _, _, rows = decode_png(path.read_bytes())
    # a flat series is centred: y range 1.5 .. 2.5; x spans the two finite points
    top, bottom = MARGIN_TOP, 80 - MARGIN_BOTTOM - 1
    centre = bottom - round(0.5 * (bottom - top))
    assert pixel(rows, MARGIN_LEFT, centre) == BLUE and pixel(rows, 100 - MARGIN_RIGHT - 1, centre) == BLUE
    assert pixel(rows, MARGIN_LEFT, top) != BLUE
    path = line_plot([], [], tmp_path / "empty.png", width=100, height=80)
    _, _, rows = decode_png(path.read_bytes())
    assert not any(bytes(BLUE) in row for row in rows)
    assert pixel(rows, MARGIN_LEFT, MARGIN_TOP + 5) == BLACK


@pytest.mark.parametrize("value, text", [(0.012345, "0.0123"), (1.5e-05, "1.5e-05"), (250.0, "250"), (3, "3")])
def test_tick_labels(value, text):
    assert tick_label(value) == text
