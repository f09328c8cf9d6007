"""Figures from plain data (NumPy arrays, floats, strings) to PNG bytes, with matplotlib's object API.

This module imports neither torch nor Lightning: the render worker (``python -m lightning_stiffness.images.drawing``,
started by :mod:`~lightning_stiffness.images.render_worker`) imports only it, NumPy, matplotlib and Pillow. A probe
draws nine images or more, so each must cost milliseconds, not the quarter second of a figure drawn from scratch:

- templates: a figure of the same shape (same classes, same pair) is built once and later only gets new data, at
  positions computed once from its size and labels (no layout engine);
- blitting: what does not change between probes (axes, ticks, labels, legend, colour bar) is drawn once per template
  and kept as pixels; a probe draws only its own artists (curves, markers, lines) over a copy of them;
- a class matrix's cells are painted straight into the pixels with its colour map (matplotlib would resample the
  image), and the texts that change every probe (titles, the ξ label) are rasterised by Pillow from the same font
  file at the same size: matplotlib's Agg text path costs about 8 ms a text, Pillow's under 1 ms.

:meth:`Painter.figure` still returns the complete matplotlib figure of a spec (texts included), for the report and
for tests that read the drawn data.
"""

import functools
import io
import math
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import numpy as np
from matplotlib import font_manager
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

DPI = 100
#: Diverging colour map for stiffness, fixed to [-1, 1] so that colours mean the same thing in every image.
STIFFNESS_CMAP = "RdBu_r"
#: The y-range of every stiffness axis (cosine and sign stiffness both lie in [-1, 1]).
STIFFNESS_RANGE = (-1.05, 1.05)

# Sizes for a small display. TensorBoard shows an image about 270-300 px wide (a card; W&B and MLflow panels are
# of the same order), so every image is a small picture with large type rather than a page: 4.8 inches (480 px at
# DPI) wide, its type at least 1/29 of that width (12 pt, 17 px: about 10 px on a 300-px card), most of it 13-14 pt
# (11-12 px there), few words, few ticks and thick lines. A matrix of many classes is drawn at a higher dpi (same
# layout, more pixels a cell), so its type keeps the same share of its width.
#: Width of every image, inches.
WIDTH = 4.8
#: Titles and axis labels, points.
LABEL_PT = 14.0
#: Tick labels, legends and notes, points.
TICK_PT = 13.0
#: The smallest size a long title or label is shrunk to before it is shortened with "…", points.
MIN_PT = 12.0
#: Lines through data and fitted lines, points.
LINE_WIDTH = 2.2
#: At most this many class names (or layer names) an axis: more would not be readable at card size.
MAX_TICK_LABELS = 10
#: Tick labels longer than this many characters are shortened with "…".
MAX_TICK_CHARS = 10
#: A class matrix of more classes than this is drawn at a higher dpi (up to 3 x DPI), so that a cell keeps a few
#: pixels when the image is opened at full size.
MATRIX_CLASSES_AT_DPI = 60


@dataclass(frozen=True)
class Line:
    """A least-squares line ``y = intercept + slope * x`` drawn over ``[low, high]``, and its zero crossing ``xi``."""

    intercept: float
    slope: float
    xi: float
    low: float
    high: float

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


@dataclass(frozen=True)
class MatrixSpec:
    """A class stiffness matrix: rows are classes of the row set's examples, columns of the column set's; ``title``
    is one or two lines (split at ``"\\n"``), each drawn as its own centred line."""

    matrix: np.ndarray
    class_names: tuple[str, ...]
    title: str
    row_label: str
    col_label: str


@dataclass(frozen=True)
class CurveSpec:
    """Mean stiffness against distance within and between classes, with the fitted lines of same-class pairs.

    ``fit`` is the least-squares line through all same-class pairs (its zero crossing is the paper's ξ);
    ``bin_fit``, when given, the line through the within-class bin means, each non-empty bin weighted equally;
    ``within_band``/``between_band``, when given, the (low, high) ends per bin of the bin means' 95% bootstrap
    intervals, drawn as a band; ``xlim``, when given, the distance axis's range (otherwise the edges'), so that the
    curves of one probe can share an axis. ``title`` is one line: the drawing says ξ in a second one.
    """

    edges: np.ndarray
    within_mean: np.ndarray
    within_count: np.ndarray
    between_mean: np.ndarray
    between_count: np.ndarray
    fit: Line | None
    bin_fit: Line | None
    title: str
    xlabel: str
    ylabel: str
    within_band: tuple[np.ndarray, np.ndarray] | None = None
    between_band: tuple[np.ndarray, np.ndarray] | None = None
    xlim: tuple[float, float] | None = None


@dataclass(frozen=True)
class LayersSpec:
    """Within/between-class stiffness of each layer's own gradients, in network order."""

    layers: tuple[str, ...]
    within: tuple[float, ...]
    between: tuple[float, ...]
    title: str


@dataclass(frozen=True)
class XiBarsSpec:
    """ξ in input space and in each layer's representation, in network order; ``extrapolated`` says, per value,
    whether it lies beyond the distances its line was fitted on (None: no ξ; empty: not known)."""

    names: tuple[str, ...]
    values: tuple[float, ...]
    title: str
    extrapolated: tuple[bool | None, ...] = ()


#: Any figure spec: what :class:`Painter` draws, the render worker receives and the image writer sends.
ImageSpec: TypeAlias = MatrixSpec | CurveSpec | LayersSpec | XiBarsSpec


# ------------------------------------------------------------------------------------------------------ templates


def _agg(figure: Figure) -> FigureCanvasAgg:
    """The figure's Agg canvas (every figure here gets one when it is made)."""
    return cast(FigureCanvasAgg, figure.canvas)


def _fixed_figure(width: float, height: float, dpi: float = DPI) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _axes_in_inches(figure: Figure, left: float, bottom: float, right: float, top: float):
    """Axes with margins given in inches (no layout engine: positions are computed once)."""
    width, height = figure.get_size_inches()
    return figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))


def _text_inches(characters: int, size: float = TICK_PT) -> float:
    """Inches that ``characters`` characters take at ``size`` points (about 0.62 em a character)."""
    return 0.62 * size / 72 * characters


def _label_margin(labels: Sequence[str], size: float = TICK_PT) -> float:
    """Inches that tick labels need beside an axis (or under it, turned)."""
    return 0.12 + _text_inches(max((len(label) for label in labels), default=1), size)


#: Inches an axis label needs beside its tick labels.
_AXIS_LABEL = 1.45 * LABEL_PT / 72
#: Inches from one title line's baseline to the next.
_TITLE_LINE = 1.3 * LABEL_PT / 72


def _title_room(lines: int) -> float:
    """Inches that ``lines`` title lines take at the top of a figure."""
    return 0.12 + lines * _TITLE_LINE


def _title_lines(figure: Figure, lines: int) -> list[Text]:
    """``lines`` empty title texts centred at the top of ``figure``, in :func:`_title_room`; one text a line, so
    that Pillow draws each where matplotlib would."""
    height = figure.get_size_inches()[1]
    return [
        figure.text(0.5, 1 - (0.06 + (index + 0.8) * _TITLE_LINE) / height, "", ha="center", va="baseline")
        for index in range(lines)
    ]


def _shorten(text: str, characters: int, keep_end: bool = False) -> str:
    """``text``, cut to ``characters`` characters with "…" where it was cut (its end kept when ``keep_end``)."""
    if len(text) <= characters:
        return text
    return "…" + text[len(text) - characters + 1 :] if keep_end else text[: characters - 1] + "…"


def _shorten_middle(text: str, characters: int) -> str:
    """``text``, cut to ``characters`` characters with "…" in the middle (both ends say most about a name)."""
    if len(text) <= characters:
        return text
    head = characters // 2
    tail = characters - 1 - head
    return text[:head] + "…" + (text[len(text) - tail :] if tail else "")


#: Pillow's anchors for matplotlib's alignments (horizontal, then vertical; https://pillow.readthedocs.io, "Text
#: anchors").
_HORIZONTAL = {"left": "l", "center": "m", "right": "r"}
_VERTICAL = {"baseline": "s", "center_baseline": "s", "bottom": "d", "center": "m", "top": "a"}


@functools.lru_cache(maxsize=64)
def _font(properties: font_manager.FontProperties, size_px: float) -> ImageFont.FreeTypeFont:
    """The font file matplotlib would use for ``properties``, opened by Pillow at ``size_px`` pixels, laid out as
    matplotlib lays it out (Pillow's basic layout: with libraqm's, a line runs about 3% wider, which at this type's
    size moves a title's ends by 5 px)."""
    return ImageFont.truetype(font_manager.findfont(properties), size_px, layout_engine=ImageFont.Layout.BASIC)


def _draw_text(image: Image.Image, text: Text, dpi: float) -> None:
    """Rasterise a matplotlib ``text`` with Pillow where matplotlib would draw it: horizontal texts at their
    alignment; texts turned by 90 degrees (axis labels) are centred on their position, so use ``ha=va="center"``."""
    if not text.get_visible() or not text.get_text():
        return
    x, y = text.get_transform().transform(text.get_unitless_position())
    y = image.height - y  # Pillow counts rows from the top
    font = _font(text.get_fontproperties().copy(), float(text.get_fontsize()) * dpi / 72)
    colour = tuple(round(255 * c) for c in to_rgba(text.get_color())[:3])
    if text.get_rotation() == 0:
        anchor = _HORIZONTAL[text.get_horizontalalignment()] + _VERTICAL[text.get_verticalalignment()]
        ImageDraw.Draw(image).text((x, y), text.get_text(), font=font, fill=colour, anchor=anchor)
        return
    left, top, right, bottom = font.getbbox(text.get_text(), anchor="ls")
    mask = Image.new("L", (int(right - left), int(bottom - top)))
    ImageDraw.Draw(mask).text((-left, -top), text.get_text(), font=font, fill=255, anchor="ls")
    mask = mask.rotate(text.get_rotation(), expand=True)
    image.paste(colour, (round(x - mask.width / 2), round(y - mask.height / 2)), mask)


def _fit_text(text: Text, content: str, size: float, room_px: float) -> None:
    """Set ``content`` at ``size`` points, smaller (down to :data:`MIN_PT`) when it would be wider than ``room_px``
    pixels, and shortened in the middle with "…" when even that is too wide."""
    properties = text.get_fontproperties().copy()
    dpi = _dpi(text)

    def width(candidate: str, points: float) -> float:
        # Pillow's advance widths (basic layout) are matplotlib's, give or take a pixel: 6% to spare.
        return 1.06 * _font(properties, points * dpi / 72).getlength(candidate)

    points = max(MIN_PT, size * min(1.0, room_px / max(width(content, size), 1.0)))
    fitted, keep = content, len(content)
    while keep > 1 and width(fitted, points) > room_px:
        keep -= 1
        fitted = _shorten_middle(content, keep)
    text.set_text(fitted)
    text.set_fontsize(points)


def _dpi(artist: Artist) -> float:
    """The dots per inch of the figure ``artist`` is in."""
    figure = artist.get_figure()
    return float(figure.dpi) if figure is not None else float(DPI)


def _room_around(figure: Figure, centre: float) -> float:
    """Pixels a text centred at ``centre`` (a fraction of the figure's width) has before either edge."""
    width = figure.get_size_inches()[0] * figure.dpi
    return 2 * min(centre, 1 - centre) * width - 8


def _stiffness_ticks(axes: Any) -> None:
    """The stiffness axis's range and three labelled ticks (-1, 0, 1), with grid lines at ±0.5 as well."""
    axes.set_ylim(*STIFFNESS_RANGE)
    axes.set_yticks([-1.0, 0.0, 1.0], labels=["−1", "0", "1"])
    axes.set_yticks([-0.5, 0.5], minor=True)
    axes.grid(alpha=0.3, which="both")


def _set_title(figure: Figure, lines: Sequence[str]) -> None:
    """``lines`` as the figure's title, one centred text a line, each fitted to the figure's width."""
    for text, line in zip(_title_lines(figure, len(lines)), lines, strict=True):
        _fit_text(text, line, LABEL_PT, _room_around(figure, 0.5))


class _Blit:
    """One template figure drawn fast: its static part once per ``key`` (kept as pixels), then per spec only
    ``artists`` over those pixels and ``texts`` by Pillow.

    Args:
        figure: the template's figure.
        artists: what changes per spec and matplotlib draws (lines, markers), in drawing order.
        texts: the texts that change per spec (horizontal, or turned and centred: see :func:`_draw_text`).

    The static part lies under the changing artists, so a template keeps its legend outside the axes.
    """

    #: Backgrounds kept per template (one per x-range of a curve, say); the oldest goes first.
    KEEP = 8

    def __init__(self, figure: Figure, artists: Sequence[Artist], texts: Sequence[Text]) -> None:
        self.figure, self.artists, self.texts = figure, tuple(artists), tuple(texts)
        self._backgrounds: dict[Any, Any] = {}

    def whole(self) -> Figure:
        """The figure with every artist in its ordinary drawing (to save it, or to read what it shows)."""
        self._animate(False)
        return self.figure

    def _animate(self, animated: bool) -> None:
        for artist in (*self.artists, *self.texts):
            artist.set_animated(animated)  # animated artists are left out of the static drawing

    def image(self, key: Any, paint: Callable[[np.ndarray], None] | None = None) -> Image.Image:
        """The figure as drawn now, as an RGB image; ``key`` names the static part (its limits and labels),
        ``paint(rgba)`` may write into the canvas's [H, W, 4] pixels between the background and the artists."""
        self._animate(True)
        canvas = _agg(self.figure)
        if key not in self._backgrounds:
            canvas.draw()
            if len(self._backgrounds) >= self.KEEP:
                self._backgrounds.pop(next(iter(self._backgrounds)))
            self._backgrounds[key] = canvas.copy_from_bbox(self.figure.bbox)
        canvas.restore_region(self._backgrounds[key])
        if paint is not None:
            paint(np.asarray(canvas.buffer_rgba()))
        for artist in self.artists:
            if artist.get_visible():
                self.figure.draw_artist(artist)
        width, height = canvas.get_width_height()
        image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
        for text in self.texts:
            _draw_text(image, text, self.figure.dpi)
        return image


class _MatrixTemplate:
    """Class matrices of one set of class names; the axis labels (which probe set is on which axis) are texts of
    the figure that change with the spec, so that every pair and kind shares one drawn background.

    The figure is :data:`WIDTH` wide whatever the number of classes: at most :data:`MAX_TICK_LABELS` class names
    an axis, each at most :data:`MAX_TICK_CHARS` characters; many classes raise the dpi instead."""

    #: Inches right of the matrix: the gap, the colour bar, its tick labels and its label.
    RIGHT = 1.0

    def __init__(self, class_names: tuple[str, ...]) -> None:
        size = len(class_names)
        ticks = range(0, size, math.ceil(size / MAX_TICK_LABELS))
        names = [_shorten_middle(class_names[index], MAX_TICK_CHARS) for index in ticks]
        left = _label_margin(names) + _AXIS_LABEL
        side = WIDTH - left - self.RIGHT
        longest = max((len(name) for name in names), default=1)
        rotate = len(names) * (_text_inches(longest) + 0.1) > side  # names side by side would overlap: turned
        bottom = (_label_margin(names) if rotate else 1.6 * TICK_PT / 72) + _AXIS_LABEL
        top = _title_room(2)
        height = side + bottom + top
        self.figure = _fixed_figure(WIDTH, height, DPI * min(3.0, max(1.0, size / MATRIX_CLASSES_AT_DPI)))
        self.axes = _axes_in_inches(self.figure, left, bottom, self.RIGHT, top)
        position = self.axes.get_position()
        colour_axes = self.figure.add_axes(((left + side + 0.12) / WIDTH, position.y0, 0.16 / WIDTH, position.height))
        self.image = self.axes.imshow(np.zeros((size, size)), cmap=STIFFNESS_CMAP, vmin=-1.0, vmax=1.0, aspect="auto")
        colour_bar = self.figure.colorbar(self.image, cax=colour_axes, ticks=[-1.0, 0.0, 1.0])
        colour_bar.set_label("stiffness", fontsize=LABEL_PT)
        colour_axes.tick_params(labelsize=TICK_PT)
        self.axes.set_xticks(ticks, labels=names, rotation=90 if rotate else 0)
        self.axes.set_yticks(ticks, labels=names)
        self.axes.tick_params(labelsize=TICK_PT)
        centre_x, centre_y = (position.x0 + position.x1) / 2, (position.y0 + position.y1) / 2
        label: dict[str, Any] = {"ha": "center", "va": "center", "fontsize": LABEL_PT}
        self.col_label = self.figure.text(centre_x, _AXIS_LABEL / 2 / height, "", **label)
        self.row_label = self.figure.text(_AXIS_LABEL / 2 / WIDTH, centre_y, "", rotation=90, **label)
        self.titles = _title_lines(self.figure, 2)  # the probe, then within and between
        # The cells are painted into the pixels (`_paint_cells`); the frame goes over them, as imshow's would.
        self._blit = _Blit(
            self.figure, [self.image, *self.axes.spines.values()], [*self.titles, self.col_label, self.row_label]
        )
        self._cells: np.ndarray | None = None

    def draw(self, spec: MatrixSpec) -> Figure:
        self.image.set_visible(True)
        self.image.set_data(np.ma.masked_invalid(np.asarray(spec.matrix, dtype=np.float64)))
        first, _, second = spec.title.partition("\n")
        for text, line in zip(self.titles, (first, second.replace("\n", " ")), strict=True):
            _fit_text(text, line, LABEL_PT, _room_around(self.figure, 0.5))
        _fit_text(self.col_label, spec.col_label, LABEL_PT, _room_around(self.figure, self.col_label.get_position()[0]))
        centre_y = self.row_label.get_position()[1]  # the room above and below the matrix's centre
        _fit_text(
            self.row_label, spec.row_label, LABEL_PT, 2 * min(centre_y, 1 - centre_y) * self.figure.bbox.height - 8
        )
        return self._blit.whole()

    def render(self, spec: MatrixSpec) -> Image.Image:
        self.draw(spec)
        self.image.set_visible(False)
        # The image's own colour map and norm; a missing value (a class without pairs) shows the axes' white.
        self._cells = self.image.to_rgba(self.image.get_array(), bytes=True)
        return self._blit.image("matrix", self._paint_cells)

    def _paint_cells(self, rgba: np.ndarray) -> None:
        """Each pixel whose centre lies inside the axes gets its cell's colour (nearest, as imshow draws it)."""
        if self._cells is None:  # set by the call that paints (see render)
            return
        rows, cols = self._cells.shape[:2]
        x0, y0, x1, y1 = self.axes.bbox.extents
        height = rgba.shape[0]
        xs = np.arange(math.ceil(x0 - 0.5), math.floor(x1 - 0.5) + 1)
        ys = np.arange(math.ceil(height - y1 - 0.5), math.floor(height - y0 - 0.5) + 1)  # rows, top down
        col = np.clip(((xs + 0.5 - x0) / (x1 - x0) * cols).astype(int), 0, cols - 1)
        row = np.clip(((ys + 0.5 - (height - y1)) / (y1 - y0) * rows).astype(int), 0, rows - 1)
        colours = self._cells.copy()
        colours[colours[..., 3] == 0] = 255  # masked (NaN) cells: the white behind the image
        rgba[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = colours.take(row, axis=0).take(col, axis=1)


_CURVE_STYLES = {"within": ("within", "tab:blue", "o"), "between": ("between", "tab:red", "s")}


class _CurveTemplate:
    """Distance curves: the probe and ξ in two title lines, the legend in two rows under the axis label."""

    #: Inches under the axes: tick labels, the axis label, then the legend's two rows.
    BOTTOM = 1.5
    HEIGHT = 4.35

    def __init__(self) -> None:
        self.figure = _fixed_figure(WIDTH, self.HEIGHT)
        self.axes = _axes_in_inches(self.figure, 0.85, self.BOTTOM, 0.2, _title_room(2))
        axes = self.axes
        axes.axhline(0.0, color="grey", linewidth=1.0)
        _stiffness_ticks(axes)
        axes.xaxis.set_major_locator(MaxNLocator(nbins=4))
        axes.tick_params(labelsize=TICK_PT)
        self.lines, self.dots, self.bands = {}, {}, {}
        for side, (label, colour, marker) in _CURVE_STYLES.items():
            self.bands[side] = axes.fill_between([], [], [], color=colour, alpha=0.2, linewidth=0, gid=f"band-{side}")
            (self.lines[side],) = axes.plot([], [], color=colour, linewidth=1.4, alpha=0.6)
            self.dots[side] = axes.scatter([], [], color=colour, marker=marker, label=label, zorder=3)
        (self.fit,) = axes.plot([], [], color="black", linewidth=LINE_WIDTH, gid="fit-pairs", label="pair fit")
        (self.bin_fit,) = axes.plot(
            [], [], color="black", linewidth=0.8 * LINE_WIDTH, linestyle=":", gid="fit-bins", label="bin fit"
        )
        self.xi_line = axes.axvline(0.0, color="black", linestyle="--", linewidth=0.7 * LINE_WIDTH, gid="xi")
        self.title, self.xi_text = _title_lines(self.figure, 2)  # the probe, then ξ
        self.xi_text.set_gid("xi-label")
        self._banded: bool | None = None
        self._blit = _Blit(
            self.figure,
            [*self.bands.values(), *self.lines.values(), *self.dots.values(), self.fit, self.bin_fit, self.xi_line],
            [self.title, self.xi_text],
        )

    def draw(self, spec: CurveSpec) -> Figure:
        edges = np.asarray(spec.edges, dtype=np.float64)
        centres = (edges[1:] + edges[:-1]) / 2
        largest = max(1, int(np.max(spec.within_count, initial=0)), int(np.max(spec.between_count, initial=0)))
        for side in _CURVE_STYLES:
            mean = np.asarray(getattr(spec, f"{side}_mean"), dtype=np.float64)
            count = np.asarray(getattr(spec, f"{side}_count"), dtype=np.float64)
            seen = count > 0
            self.lines[side].set_data(centres[seen], mean[seen])
            self.dots[side].set_offsets(np.column_stack([centres[seen], mean[seen]]))
            self.dots[side].set_sizes(12 + 200 * count[seen] / largest)
            self.bands[side].set_verts(_band_polygons(centres, getattr(spec, f"{side}_band")))
        low, high = spec.xlim or (float(edges[0]), float(edges[-1]))
        pad = 0.03 * (high - low or 1.0)
        self.axes.set_xlim(low - pad, high + pad)
        for artist, line in ((self.fit, spec.fit), (self.bin_fit, spec.bin_fit)):
            if line is not None and math.isfinite(line.slope):
                artist.set_data([line.low, line.high], [line.at(line.low), line.at(line.high)])
            else:
                artist.set_data([], [])
        self._mark_xi(spec.fit, low - pad, high + pad)
        self._legend(spec.within_band is not None or spec.between_band is not None)
        position = self.axes.get_position()
        _fit_text(
            self.axes.xaxis.label, spec.xlabel, LABEL_PT, _room_around(self.figure, (position.x0 + position.x1) / 2)
        )
        _fit_text(self.axes.yaxis.label, spec.ylabel, LABEL_PT, self.axes.bbox.height + 40)
        _fit_text(self.title, spec.title.replace("\n", " "), LABEL_PT, _room_around(self.figure, 0.5))
        return self._blit.whole()

    def render(self, spec: CurveSpec) -> Image.Image:
        self.draw(spec)
        return self._blit.image((self.axes.get_xlim(), spec.xlabel, spec.ylabel, self._banded))

    def _legend(self, banded: bool) -> None:
        """The legend (part of the drawn background: the probe's own artists go over it), with the bands' entry
        when the curves have bands, in two rows under the axis label, where no data can run beneath it."""
        if banded == self._banded:
            return
        self._banded = banded
        handles: list[Artist] = [
            Line2D([], [], color=colour, marker=marker, markersize=7, linewidth=1.4, label=label)
            for label, colour, marker in _CURVE_STYLES.values()
        ]
        handles += [self.fit, self.bin_fit]
        if banded:
            handles.append(Patch(color="grey", alpha=0.35, label="95% CI"))
        handles.append(Line2D([], [], color="grey", marker="o", markersize=9, linestyle="none", label="area ∝ pairs"))
        self.axes.legend(
            handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), bbox_transform=self.figure.transFigure,
            ncols=3, fontsize=TICK_PT, frameon=False, handlelength=1.5, handletextpad=0.5, columnspacing=1.0,
            borderaxespad=0.1,
        )  # fmt: skip

    def _mark_xi(self, fit: Line | None, left: float, right: float) -> None:
        """ξ as a dashed line when it lies in the plotted range, and in the second title line: its value, or that it
        was extrapolated and to which side (the axis is not stretched to it), or that there is none."""
        xi = fit.xi if fit is not None else math.nan
        inside = math.isfinite(xi) and left <= xi <= right
        self.xi_line.set_visible(inside)
        if inside:
            self.xi_line.set_xdata([xi, xi])
            note = f"ξ = {xi:.3g}"
        elif not math.isfinite(xi):
            note = "no ξ (the fit does not fall)"
        else:
            note = f"ξ ≈ {xi:.3g} (extrapolated {'→' if xi > right else '←'})"
        _fit_text(self.xi_text, note, LABEL_PT, _room_around(self.figure, 0.5))


def _band_polygons(centres: np.ndarray, band: tuple[np.ndarray, np.ndarray] | None) -> list[np.ndarray]:
    """The outline of a band (low, high per bin) over the bin centres, one polygon per run of bins where both ends
    are finite (a bin with no pairs, or an interval that could not be formed, leaves a gap)."""
    if band is None:
        return []
    low, high = (np.asarray(end, dtype=np.float64) for end in band)
    finite = np.isfinite(low) & np.isfinite(high)
    polygons, start = [], None
    for index in range(len(centres) + 1):
        inside = index < len(centres) and finite[index]
        if inside and start is None:
            start = index
        elif not inside and start is not None:
            run = slice(start, index)
            xs = np.concatenate([centres[run], centres[run][::-1]])
            polygons.append(np.column_stack([xs, np.concatenate([low[run], high[run][::-1]])]))
            start = None
    return polygons


def _named_axis_figure(names: Sequence[str], title: Sequence[str]) -> tuple[Figure, Any, np.ndarray]:
    """A :data:`WIDTH`-wide figure under ``title`` (one text a line) whose x axis names ``names`` at positions 0,
    1, ... (at most :data:`MAX_TICK_LABELS` of them, shortened keeping their ends, turned when they would not fit
    side by side): the figure, its axes and the positions."""
    positions = np.arange(len(names))
    shown = positions[:: math.ceil(len(names) / MAX_TICK_LABELS)] if len(names) else positions
    labels = [_shorten(names[index], MAX_TICK_CHARS, keep_end=True) for index in shown]
    left, right = 0.85, 0.15
    longest = max((len(label) for label in labels), default=1)
    rotate = len(labels) * (_text_inches(longest) + 0.1) > WIDTH - left - right
    bottom = (_label_margin(labels) if rotate else 1.6 * TICK_PT / 72) + 0.1
    top = _title_room(len(title))
    figure = _fixed_figure(WIDTH, 2.6 + bottom + top)
    axes = _axes_in_inches(figure, left, bottom, right, top)
    axes.set_xticks(shown, labels=labels, rotation=90 if rotate else 0)
    axes.tick_params(labelsize=TICK_PT)
    axes.set_xlim(-0.6, len(names) - 0.4)
    _set_title(figure, title)
    return figure, axes, positions


def _layers_figure(spec: LayersSpec) -> Figure:
    figure, axes, positions = _named_axis_figure(spec.layers, [spec.title])
    style = {"linewidth": LINE_WIDTH, "markersize": 8}
    axes.plot(positions, spec.within, marker="o", color="tab:blue", label="within", **style)
    axes.plot(positions, spec.between, marker="s", color="tab:red", label="between", **style)
    axes.axhline(0.0, color="grey", linewidth=1.0)
    axes.set_ylabel("cosine stiffness", fontsize=LABEL_PT)
    _stiffness_ticks(axes)
    axes.legend(loc="best", fontsize=TICK_PT, handlelength=1.5, borderaxespad=0.3)
    return figure


def _xi_bars_figure(spec: XiBarsSpec) -> Figure:
    flags = spec.extrapolated or (None,) * len(spec.values)
    # A second title line says what the hatching means, where no bar can run beneath it.
    title = [spec.title, "hatched: extrapolated"] if any(flags) else [spec.title]
    figure, axes, positions = _named_axis_figure(spec.names, title)
    heights = [v if math.isfinite(v) else 0.0 for v in spec.values]
    bars = axes.bar(positions, heights, color=["tab:grey"] + ["tab:blue"] * (len(spec.names) - 1))
    turn = 90 if len(spec.values) > 6 else 0  # the values side by side would overlap
    for bar, value, flag in zip(bars, spec.values, flags, strict=True):
        if flag:  # drawn open and hatched: where the line would cross zero, not a distance that was observed
            bar.set_fill(False)
            bar.set_hatch("//")
            bar.set_linewidth(1.5)
        label = f"{value:.3g}" if math.isfinite(value) else "no ξ"
        axes.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
            fontsize=TICK_PT, rotation=turn, xytext=(0, 2), textcoords="offset points",
        )  # fmt: skip
    tallest = max(heights, default=0.0) or 1.0
    axes.set_ylim(0.0, tallest * (1.6 if turn else 1.22))  # room for the values over the bars
    axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
    axes.set_ylabel("critical distance ξ", fontsize=LABEL_PT)
    axes.grid(alpha=0.3, axis="y")
    return figure


class Painter:
    """Draws specs into figures, reusing one template per shape of figure (kept for the painter's lifetime)."""

    def __init__(self) -> None:
        self._templates: dict[tuple, Any] = {}

    def figure(self, spec: ImageSpec) -> Figure:
        """The drawn figure of ``spec`` (a template's figure: valid until the next spec of the same shape)."""
        if isinstance(spec, MatrixSpec):
            return self._matrix(spec).draw(spec)
        if isinstance(spec, CurveSpec):
            return self._template(("curve",), _CurveTemplate).draw(spec)
        builders: dict[type, Callable[[Any], Figure]] = {LayersSpec: _layers_figure, XiBarsSpec: _xi_bars_figure}
        return builders[type(spec)](spec)

    def _matrix(self, spec: MatrixSpec) -> _MatrixTemplate:
        return self._template(("matrix", spec.class_names), lambda: _MatrixTemplate(spec.class_names))

    def _template(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._templates:
            self._templates[key] = build()
        return self._templates[key]

    def png(self, spec: ImageSpec) -> bytes:
        """``spec`` drawn and encoded as PNG."""
        buffer = io.BytesIO()
        self._image(spec).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def rgb(self, spec: ImageSpec) -> np.ndarray:
        """``spec`` drawn as an RGB array (H, W, 3, uint8)."""
        return np.asarray(self._image(spec))

    def _image(self, spec: ImageSpec) -> Image.Image:
        if isinstance(spec, MatrixSpec):
            return self._matrix(spec).render(spec)
        if isinstance(spec, CurveSpec):
            return self._template(("curve",), _CurveTemplate).render(spec)
        figure = self.figure(spec)
        canvas = _agg(figure)
        canvas.draw()
        return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])


def render_all(painter: Painter, specs: Mapping[str, ImageSpec]) -> dict[str, bytes]:
    """Every spec (by tag) as PNG bytes."""
    return {tag: painter.png(spec) for tag, spec in specs.items()}


def serve(inbound=None, outbound=None) -> None:
    """The render worker's loop: read ``(job, specs)`` pickles, answer ``(job, pngs or error text)`` pickles.

    Ends at end of input (the parent closed the pipe or exited).
    """
    inbound = inbound or sys.stdin.buffer
    outbound = outbound or sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed while drawing must not corrupt the answers
    if threading.current_thread() is threading.main_thread():
        # Ctrl+C is for the training process, which hands out every image this worker still draws.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    painter = Painter()
    while True:
        try:
            job, specs = pickle.load(inbound)
        except (EOFError, pickle.UnpicklingError):
            return
        try:
            answer: Any = render_all(painter, specs)
        except Exception as err:  # reported to the parent, which warns; the worker keeps serving
            answer = f"{type(err).__name__}: {err}"
        pickle.dump((job, answer), outbound, protocol=pickle.HIGHEST_PROTOCOL)
        outbound.flush()


if __name__ == "__main__":
    serve()
