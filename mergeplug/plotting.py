"""Plots written as PNG files with the standard library only (zlib and struct): a line plot (training loss), a
grouped bar chart and a labelled scatter plot (the bench report).

matplotlib is not a dependency, and these plots need little: a white canvas, axes with "nice" ticks, text in a
3x5 pixel font (upper- and lower-case letters, digits and the punctuation that model labels and numbers use; any
other character is drawn as a filled box, so a label never crashes a plot), filled rectangles and lines.
The PNG is 8-bit RGB, one IDAT chunk, every scanline with filter 0 (PNG specification, ISO/IEC 15948), written
to a temporary file and renamed so that a reader never sees half a picture.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .atomic import write_bytes

Colour = tuple[int, int, int]
WHITE, BLACK, GREY, BLUE = (255, 255, 255), (0, 0, 0), (200, 200, 200), (31, 119, 180)
DARK_GREY = (110, 110, 110)
#: Series colours in order of first appearance: matplotlib's "tab10" cycle (colour-blind-aware, widely known).
PALETTE: tuple[Colour, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
#: Pixels around the line plot's plotting area: left (y tick labels), right, top, bottom (x tick labels, title).
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 20, 50
#: 3x5 glyphs, one 3-bit row per entry, top row first (bit 2 is the left pixel). Lower-case letters use rows 1-4
#: (ascenders reach row 0); there is no room for descenders, so g, j, p, q and y sit on the baseline.
FONT: dict[str, tuple[int, int, int, int, int]] = {
    " ": (0, 0, 0, 0, 0),
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (5, 7, 7, 7, 5), "O": (2, 5, 5, 5, 2),
    "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2),
    "Z": (7, 1, 2, 4, 7),
    "a": (0, 6, 3, 5, 7), "b": (4, 4, 6, 5, 6), "c": (0, 3, 4, 4, 3), "d": (1, 1, 3, 5, 3), "e": (0, 7, 7, 4, 7),
    "f": (1, 2, 7, 2, 2), "g": (0, 3, 5, 3, 6), "h": (4, 4, 6, 5, 5), "i": (2, 0, 2, 2, 2), "j": (1, 0, 1, 5, 2),
    "k": (4, 5, 6, 6, 5), "l": (6, 2, 2, 2, 7), "m": (0, 7, 7, 5, 5), "n": (0, 6, 5, 5, 5), "o": (0, 7, 5, 5, 7),
    "p": (0, 7, 5, 7, 4), "q": (0, 7, 5, 7, 1), "r": (0, 5, 6, 4, 4), "s": (0, 3, 6, 1, 6), "t": (2, 7, 2, 2, 3),
    "u": (0, 5, 5, 5, 3), "v": (0, 5, 5, 5, 2), "w": (0, 5, 5, 7, 7), "x": (0, 5, 2, 2, 5), "y": (0, 5, 5, 3, 6),
    "z": (0, 7, 3, 6, 7),
    "_": (0, 0, 0, 0, 7), "-": (0, 0, 7, 0, 0), ".": (0, 0, 0, 0, 2), ":": (0, 2, 0, 2, 0), "/": (1, 1, 2, 4, 4),
    "%": (5, 1, 2, 4, 5), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "=": (0, 7, 0, 7, 0), ",": (0, 0, 0, 2, 4),
    "+": (0, 2, 7, 2, 0), "'": (2, 2, 0, 0, 0), '"': (5, 5, 0, 0, 0), "!": (2, 2, 2, 0, 2), "?": (7, 1, 2, 0, 2),
    "[": (3, 2, 2, 2, 3), "]": (6, 2, 2, 2, 6), "<": (1, 2, 4, 2, 1), ">": (4, 2, 1, 2, 4), "*": (0, 5, 2, 5, 0),
    "#": (5, 7, 5, 7, 5), "|": (2, 2, 2, 2, 2), ";": (0, 2, 0, 2, 4), "^": (2, 5, 0, 0, 0), "~": (0, 3, 6, 0, 0),
    "&": (2, 5, 2, 5, 3), "@": (7, 5, 7, 4, 7), "$": (3, 6, 2, 3, 6), "{": (3, 2, 6, 2, 3), "}": (6, 2, 3, 2, 6),
    "\\": (4, 4, 2, 1, 1), "`": (4, 2, 0, 0, 0),
}
#: What a character outside :data:`FONT` looks like ("tofu"): filled, so it differs from every glyph, 0 included.
UNKNOWN_GLYPH = (7, 7, 7, 7, 7)
SCALE = 2  # each font pixel is drawn as SCALE x SCALE
#: Pixels of one character cell along the text (3 glyph columns and a blank one) and across it.
ADVANCE, TEXT_HEIGHT = 4 * SCALE, 5 * SCALE


def glyph(character: str) -> tuple[int, int, int, int, int]:
    """The 3x5 glyph drawn for ``character``: its own, or :data:`UNKNOWN_GLYPH`."""
    return FONT.get(character, UNKNOWN_GLYPH)


class Canvas:
    """An RGB image in a bytearray, with the few drawing operations the plots need."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def set(self, x: int, y: int, colour: Colour) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = 3 * (y * self.width + x)
            self.pixels[at:at + 3] = bytes(colour)

    def get(self, x: int, y: int) -> Colour:
        at = 3 * (y * self.width + x)
        return tuple(self.pixels[at:at + 3])  # type: ignore[return-value]

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: Colour) -> None:
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

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: Colour) -> None:
        """A filled rectangle, both corners included (in any order)."""
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        x0, x1, y0, y1 = max(x0, 0), min(x1, self.width - 1), max(y0, 0), min(y1, self.height - 1)
        if x0 > x1 or y0 > y1:
            return
        row = bytes(colour) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            at = 3 * (y * self.width + x0)
            self.pixels[at:at + len(row)] = row

    def text(self, x: int, y: int, text: str, colour: Colour = BLACK) -> None:
        """Draw ``text`` left to right with its top-left corner at (x, y)."""
        for i, character in enumerate(text):
            for row, bits in enumerate(glyph(character)):
                for col in range(3):
                    if bits & (4 >> col):
                        self.rect(x + i * ADVANCE + col * SCALE, y + row * SCALE,
                                  x + i * ADVANCE + col * SCALE + SCALE - 1, y + row * SCALE + SCALE - 1, colour)

    def text_up(self, x: int, y: int, text: str, colour: Colour = BLACK) -> None:
        """Draw ``text`` turned a quarter left (reading bottom to top): the text's box is TEXT_HEIGHT wide with its
        left edge at x, and the first character's baseline end at y (the box's bottom)."""
        for i, character in enumerate(text):
            for row, bits in enumerate(glyph(character)):
                for col in range(3):
                    if bits & (4 >> col):
                        along = i * ADVANCE + col * SCALE
                        self.rect(x + row * SCALE, y - along - SCALE + 1, x + row * SCALE + SCALE - 1, y - along, colour)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * self.width * y:3 * self.width * (y + 1)])
                       for y in range(self.height))
        return b"\x89PNG\r\n\x1a\n" + b"".join((
            _chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)),
            _chunk(b"IDAT", zlib.compress(raw, 9)),
            _chunk(b"IEND", b""),
        ))

    def save(self, path: str | Path) -> Path:
        """Write the PNG to a temporary file beside ``path`` and rename it into place."""
        path = Path(path)
        write_bytes(path, self.png())
        return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_width(text: str) -> int:
    return max(ADVANCE * len(text) - SCALE, 0)


def fit(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, ending in ``..`` when cut."""
    return text if len(text) <= max_chars else text[:max(max_chars - 2, 1)] + ".."


def tick_label(value: float) -> str:
    """Three significant digits, as short as the font can write (``0.0123``, ``1.5e-05``, ``250``)."""
    return f"{value:.3g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` evenly spaced round values (steps of 1, 2, 2.5 or 5 times a power of ten) covering
    [lo, hi]; the first tick is <= lo and the last >= hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    n = max(math.ceil((hi - start) / step - 1e-9), 1)
    return [round(start + k * step, 12) for k in range(n + 1)]


@dataclass
class Mark:
    """Where a bar or a point was drawn: its box (x0, y0, x1, y1, inclusive), its series and (bars) group."""

    label: str
    series: str
    value: float | None
    box: tuple[int, int, int, int]
    group: str = ""


@dataclass
class Plot:
    """A written chart: the file, the plotting area (left, top, right, bottom), every mark, the series colours."""

    path: Path
    area: tuple[int, int, int, int]
    marks: list[Mark] = field(default_factory=list)
    colours: dict[str, Colour] = field(default_factory=dict)


def series_colours(series: Sequence[str], colours: Mapping[str, Colour] | None = None) -> dict[str, Colour]:
    """Each series' colour: the one given, else the next :data:`PALETTE` colour not given to another series."""
    given = dict(colours or {})
    free = [c for c in PALETTE if c not in given.values()] or list(PALETTE)
    out, at = {}, 0
    for name in series:
        if name in given:
            out[name] = given[name]
        else:
            out[name] = free[at % len(free)]
            at += 1
    return out


def _has_legend(series: Sequence[str]) -> bool:
    """A legend is drawn unless the only series is unnamed."""
    return bool(series) and list(series) != [""]


def _legend_height(entries: Sequence[str], width: int) -> int:
    if not _has_legend(entries):
        return 0
    rows, x = 1, 8
    for name in entries:
        need = 14 + text_width(name) + 16
        if x + need > width - 8 and x > 8:
            rows, x = rows + 1, 8
        x += need
    return rows * 16


def _draw_header(canvas: Canvas, title: str, colours: Mapping[str, Colour]) -> int:
    """Title centred at the top, then the legend (a swatch and a name per series, wrapped); returns the next free y."""
    y = 8
    if title:
        shown = fit(title, max((canvas.width - 16) // ADVANCE, 4))
        canvas.text((canvas.width - text_width(shown)) // 2, y, shown)
        y += TEXT_HEIGHT + 10
    if _has_legend(list(colours)):
        x = 8
        for name, colour in colours.items():
            need = 14 + text_width(name) + 16
            if x + need > canvas.width - 8 and x > 8:
                x, y = 8, y + 16
            canvas.rect(x, y, x + 9, y + 9, colour)
            canvas.text(x + 14, y, name)
            x += need
        y += 16
    return y + 6


def _y_axis(canvas: Canvas, ticks: list[float], left: int, top: int, right: int, bottom: int,
            y_label: str) -> None:
    lo, hi = ticks[0], ticks[-1]
    for value in ticks:
        py = bottom - round((value - lo) / (hi - lo) * (bottom - top))
        canvas.line(left + 1, py, right, py, GREY)
        canvas.line(left - 4, py, left, py, BLACK)
        label = tick_label(value)
        canvas.text(left - 8 - text_width(label), py - TEXT_HEIGHT // 2, label)
    if y_label:
        shown = fit(y_label, max((bottom - top) // ADVANCE, 4))
        canvas.text_up(6, (top + bottom + text_width(shown)) // 2, shown)


def _left_margin(ticks: list[float], y_label: str) -> int:
    return max(text_width(tick_label(t)) for t in ticks) + 14 + (TEXT_HEIGHT + 10 if y_label else 0) + 6


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
    return canvas.save(path)


def _span(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)


#: Bar chart geometry in pixels: a bar's width, the gap between bars of a group and between groups.
BAR_WIDTH, BAR_GAP, GROUP_GAP = 14, 4, 24


def grouped_bar_chart(groups: Sequence[tuple[str, Sequence[tuple[str, float | None, str]]]], path: str | Path, *,
                      title: str = "", y_label: str = "", colours: Mapping[str, Colour] | None = None,
                      plot_height: int = 240, max_label_chars: int = 28) -> Plot:
    """Vertical bars in groups: ``groups`` is ``[(group name, [(bar label, value, series), ...]), ...]``.

    Each bar takes its series' colour (``colours``, else :data:`PALETTE` in order of first appearance) and the
    legend names the series. Bar labels are written upwards under the axis (cut to ``max_label_chars``), group
    names under them. The value axis has round ticks and always includes 0; a value of None (or NaN) draws no
    bar, only a grey ``n/a``. The image is as wide as its bars need.
    """
    cleaned = [(name, [(label, _finite(value), series) for label, value, series in bars]) for name, bars in groups]
    values = [v for _, bars in cleaned for _, v, _ in bars if v is not None]
    ticks = nice_ticks(min([0.0, *values]), max([0.0, *values]) if any(values) else 1.0)
    order = list(dict.fromkeys(series for _, bars in cleaned for _, _, series in bars))
    palette = series_colours(order, colours)
    labels = [fit(label, max_label_chars) for _, bars in cleaned for label, _, _ in bars]
    label_depth = max([text_width(label) for label in labels] or [0])
    named_groups = any(name for name, _ in cleaned)

    left = _left_margin(ticks, y_label)
    # Each group is as wide as its bars or its (shortened) name, whichever is wider; bars are centred in it.
    layout = []
    for name, bars in cleaned:
        if bars:
            shown_name = fit(name, 24)
            bars_width = len(bars) * (BAR_WIDTH + BAR_GAP) - BAR_GAP
            layout.append((name, shown_name, bars, bars_width, max(bars_width, text_width(shown_name))))
    plot_width = sum(span for *_, span in layout) + GROUP_GAP * (len(layout) + 1)
    width = max(left + plot_width + 20, text_width(title) + 16, 360)
    header = 8 + (TEXT_HEIGHT + 10 if title else 0) + _legend_height(order, width) + 6
    top = header + 8
    bottom = top + plot_height
    height = bottom + 8 + label_depth + (TEXT_HEIGHT + 16 if named_groups else 0) + 10
    canvas = Canvas(width, height)
    _draw_header(canvas, title, palette)
    right = left + plot_width
    lo, hi = ticks[0], ticks[-1]

    def y_of(value: float) -> int:
        return bottom - round((value - lo) / (hi - lo) * (bottom - top))

    _y_axis(canvas, ticks, left, top, right, bottom, y_label)
    zero = y_of(0.0)
    marks: list[Mark] = []
    group_left = left + GROUP_GAP
    for full_name, name, bars, bars_width, span in layout:
        x = group_left + (span - bars_width) // 2
        for label, value, series in bars:
            x0, x1 = x, x + BAR_WIDTH - 1
            if value is None:
                canvas.text_up(x + (BAR_WIDTH - TEXT_HEIGHT) // 2, zero - 3, "n/a", DARK_GREY)
                box = (x0, zero, x1, zero)
            else:
                tip = y_of(value)
                # Positive bars stand on the zero line, negative ones hang from it; a zero draws nothing.
                if tip < zero:
                    box = (x0, tip, x1, zero - 1)
                elif tip > zero:
                    box = (x0, zero + 1, x1, tip)
                else:
                    box = (x0, zero, x1, zero)
                if tip != zero:
                    canvas.rect(*box, palette[series])
            marks.append(Mark(label, series, value, box, full_name))
            shown = fit(label, max_label_chars)
            canvas.text_up(x + (BAR_WIDTH - TEXT_HEIGHT) // 2, bottom + 8 + text_width(shown), shown)
            x += BAR_WIDTH + BAR_GAP
        if name:
            y = bottom + 8 + label_depth + 6
            canvas.line(group_left, y, group_left + span - 1, y, DARK_GREY)
            canvas.text(group_left + (span - text_width(name)) // 2, y + 5, name)
        group_left += span + GROUP_GAP
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    if lo < 0:
        canvas.line(left, zero, right, zero, BLACK)
    return Plot(canvas.save(path), (left, top, right, bottom), marks, palette)


def scatter_plot(points: Sequence[tuple[float, float, str, str]], path: str | Path, *, title: str = "",
                 x_label: str = "", y_label: str = "", colours: Mapping[str, Colour] | None = None,
                 width: int = 640, plot_height: int = 300, max_label_chars: int = 24) -> Plot:
    """Points ``(x, y, label, series)`` as filled squares in their series' colour, each labelled beside it.

    Points with a non-finite coordinate are left out. Both axes have round ticks over the data plus a margin; a
    label goes right of its point, else above, below or left of it, wherever it overlaps no earlier label.
    """
    kept = [(float(x), float(y), label, series) for x, y, label, series in points
            if _finite(x) is not None and _finite(y) is not None]
    order = list(dict.fromkeys(series for *_, series in kept))
    palette = series_colours(order, colours)
    y_ticks = nice_ticks(*_padded([p[1] for p in kept]))
    x_ticks = nice_ticks(*_padded([p[0] for p in kept]))
    left = _left_margin(y_ticks, y_label)
    right = width - 20 - 1
    header = 8 + (TEXT_HEIGHT + 10 if title else 0) + _legend_height(order, width) + 6
    top = header + 8
    bottom = top + plot_height
    height = bottom + 8 + TEXT_HEIGHT + 10 + (TEXT_HEIGHT + 8 if x_label else 0) + 4
    canvas = Canvas(width, height)
    _draw_header(canvas, title, palette)
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        return (left + round((x - x_lo) / (x_hi - x_lo) * (right - left)),
                bottom - round((y - y_lo) / (y_hi - y_lo) * (bottom - top)))

    _y_axis(canvas, y_ticks, left, top, right, bottom, y_label)
    for value in x_ticks:
        px = to_pixel(value, y_lo)[0]
        canvas.line(px, top, px, bottom - 1, GREY)
        canvas.line(px, bottom, px, bottom + 4, BLACK)
        label = tick_label(value)
        canvas.text(min(max(px - text_width(label) // 2, 0), width - text_width(label) - 1), bottom + 8, label)
    if x_label:
        canvas.text((left + right - text_width(x_label)) // 2, bottom + 8 + TEXT_HEIGHT + 10, x_label)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    marks: list[Mark] = []
    taken: list[tuple[int, int, int, int]] = []
    for x, y, label, series in kept:
        px, py = to_pixel(x, y)
        box = (px - 3, py - 3, px + 3, py + 3)
        canvas.rect(*box, palette[series])
        marks.append(Mark(label, series, y, box))
        taken.append(box)
    for mark in marks:
        px, py = (mark.box[0] + 3, mark.box[1] + 3)
        shown = fit(mark.label, max_label_chars)
        w = text_width(shown)
        half = TEXT_HEIGHT // 2
        spots = [(px + 6, py - half), (px - 6 - w, py - half), (px - w // 2, py - 6 - TEXT_HEIGHT),
                 (px - w // 2, py + 6), (px + 6, py - 6 - TEXT_HEIGHT), (px + 6, py + 6),
                 (px - 6 - w, py - 6 - TEXT_HEIGHT), (px - 6 - w, py + 6)]
        # Kept inside the image; the first spot that covers no point and no earlier label wins.
        spots = [(min(max(sx, 0), width - w - 1), min(max(sy, 0), height - TEXT_HEIGHT - 1)) for sx, sy in spots]
        chosen = spots[0]
        for sx, sy in spots:
            if not any(_overlap((sx, sy, sx + w - 1, sy + TEXT_HEIGHT - 1), other) for other in taken):
                chosen = (sx, sy)
                break
        taken.append((chosen[0], chosen[1], chosen[0] + w - 1, chosen[1] + TEXT_HEIGHT - 1))
        canvas.text(chosen[0], chosen[1], shown, DARK_GREY)
    return Plot(canvas.save(path), (left, top, right, bottom), marks, palette)


def _finite(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _padded(values: list[float]) -> tuple[float, float]:
    """The values' range widened by 8% a side (points stay off the axes); (0, 1) when there are none."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 if hi > lo else (abs(lo) * 0.1 or 1.0)
    # Seconds, memory and scores are never negative: keep such an axis from reaching below zero.
    return (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
