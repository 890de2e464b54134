"""A line plot written as a PNG with the standard library only (zlib and struct), for training loss curves.

matplotlib is not a dependency, and a loss curve needs little: white canvas, two axes, five ticks a side
labelled by a 3x5 pixel font (digits and the few letters the labels use), and the curve as a polyline.
The PNG is 8-bit RGB, one IDAT chunk, every scanline with filter 0 (PNG specification, ISO/IEC 15948).
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Sequence

WHITE, BLACK, GREY, BLUE = (255, 255, 255), (0, 0, 0), (200, 200, 200), (31, 119, 180)
#: Pixels around the plotting area: left (y tick labels), right, top, bottom (x tick labels and title).
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 20, 50
#: 3x5 glyphs, one 3-bit row per entry, top row first (bit 2 is the left pixel).
FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "+": (0, 2, 7, 2, 0), " ": (0, 0, 0, 0, 0),
    "e": (0, 7, 7, 4, 7), "s": (0, 3, 6, 1, 6), "t": (2, 7, 2, 2, 3), "p": (0, 7, 5, 7, 4), "l": (6, 2, 2, 2, 7),
    "o": (0, 7, 5, 5, 7), "v": (0, 5, 5, 5, 2), "r": (0, 6, 5, 4, 4),
}
SCALE = 2  # each font pixel is drawn as SCALE x SCALE


class Canvas:
    """An RGB image in a bytearray, with the few drawing operations a line plot needs."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def set(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = 3 * (y * self.width + x)
            self.pixels[at:at + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        """Bresenham's line, endpoints included."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        while True:
            self.set(x0, y0, colour)
            if x0 == x1 and y0 == y1:
                return
            twice = 2 * error
            if twice >= dy:
                error, x0 = error + dy, x0 + sx
            if twice <= dx:
                error, y0 = error + dx, y0 + sy

    def text(self, x: int, y: int, text: str, colour: tuple[int, int, int] = BLACK) -> None:
        """Draw ``text`` with its top-left corner at (x, y); characters outside :data:`FONT` are skipped."""
        for glyph in (FONT.get(c) for c in text):
            if glyph is None:
                continue
            for row, bits in enumerate(glyph):
                for col in range(3):
                    if bits & (4 >> col):
                        for d in range(SCALE * SCALE):
                            self.set(x + col * SCALE + d % SCALE, y + row * SCALE + d // SCALE, colour)
            x += 4 * SCALE

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * self.width * y:3 * self.width * (y + 1)])
                       for y in range(self.height))
        return b"\x89PNG\r\n\x1a\n" + b"".join((
            _chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)),
            _chunk(b"IDAT", zlib.compress(raw, 9)),
            _chunk(b"IEND", b""),
        ))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_width(text: str) -> int:
    return 4 * SCALE * len(text) - SCALE


def tick_label(value: float) -> str:
    """Three significant digits, as short as the font can write (``0.0123``, ``1.5e-05``, ``250``)."""
    return f"{value:.3g}"


def line_plot(xs: Sequence[float], ys: Sequence[float], path: str | Path, *, width: int = 640, height: int = 400,
              x_label: str = "step", y_label: str = "loss") -> Path:
    """Draw ys against xs (points with a non-finite value are left out) and write the PNG to ``path``.

    The axes span the data's range (a flat or single-point series gets a unit-wide range around it);
    no points at all gives the empty axes.
    """
    points = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    canvas = Canvas(width, height)
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = width - MARGIN_RIGHT - 1, height - MARGIN_BOTTOM - 1
    x_lo, x_hi = _span([p[0] for p in points])
    y_lo, y_hi = _span([p[1] for p in points])

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        return (left + round((x - x_lo) / (x_hi - x_lo) * (right - left)),
                bottom - round((y - y_lo) / (y_hi - y_lo) * (bottom - top)))

    for i in range(5):
        fraction = i / 4
        px, py = left + round(fraction * (right - left)), bottom - round(fraction * (bottom - top))
        canvas.line(px, top, px, bottom - 1, GREY)  # grid
        canvas.line(left + 1, py, right, py, GREY)
        canvas.line(px, bottom, px, bottom + 4, BLACK)  # ticks
        canvas.line(left - 4, py, left, py, BLACK)
        x_text, y_text = tick_label(x_lo + fraction * (x_hi - x_lo)), tick_label(y_lo + fraction * (y_hi - y_lo))
        canvas.text(px - text_width(x_text) // 2, bottom + 8, x_text)
        canvas.text(left - 8 - text_width(y_text), py - 5 * SCALE // 2, y_text)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.text((left + right - text_width(x_label)) // 2, height - 5 * SCALE - 6, x_label)
    canvas.text(4, 4, y_label)
    pixels = [to_pixel(x, y) for x, y in points]
    for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
        for offset in (0, 1):  # two pixels thick, so the curve stands out from the grid
            canvas.line(x0, y0 + offset, x1, y1 + offset, BLUE)
    if len(pixels) == 1:
        x0, y0 = pixels[0]
        for d in range(9):
            canvas.set(x0 - 1 + d % 3, y0 - 1 + d // 3, BLUE)
    path = Path(path)
    path.write_bytes(canvas.png())
    return path


def _span(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
