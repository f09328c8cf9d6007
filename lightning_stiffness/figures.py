"""Figures from plain data (NumPy arrays, floats, strings) to PNG bytes, with matplotlib's object API.

This module imports neither torch nor Lightning: the render worker (``python -m lightning_stiffness.figures``, started
by :mod:`~lightning_stiffness.rendering`) imports only it, NumPy and matplotlib. Figures are cheap to redraw:

- no constrained layout: each figure's axes sit at positions computed once from its size and labels;
- templates: a figure of the same shape (same classes, same pair) is built once and later only gets new data;
- few artists: no text per cell of a class matrix (its within/between means are in the title), markers as one
  collection per curve.
"""

import io
import math
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
#: Diverging colour map for stiffness, fixed to [-1, 1] so that colours mean the same thing in every image.
STIFFNESS_CMAP = "RdBu_r"
#: The y-range of every stiffness axis (cosine and sign stiffness both lie in [-1, 1]).
STIFFNESS_RANGE = (-1.05, 1.05)


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
    """A class stiffness matrix: rows are classes of the row set's examples, columns of the column set's."""

    matrix: np.ndarray
    class_names: tuple[str, ...]
    title: str
    row_label: str
    col_label: str
    colour_label: str = "stiffness"


@dataclass(frozen=True)
class CurveSpec:
    """Mean stiffness against distance within and between classes, with the fitted lines of same-class pairs.

    ``fit`` is the least-squares line through all same-class pairs (its zero crossing is the paper's ξ);
    ``bin_fit``, when given, the line through the within-class bin means, each non-empty bin weighted equally.
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


@dataclass(frozen=True)
class LayersSpec:
    """Within/between-class stiffness of each layer's own gradients, in network order."""

    layers: tuple[str, ...]
    within: tuple[float, ...]
    between: tuple[float, ...]
    title: str


@dataclass(frozen=True)
class XiBarsSpec:
    """ξ in input space and in each layer's representation, in network order."""

    names: tuple[str, ...]
    values: tuple[float, ...]
    title: str


# ------------------------------------------------------------------------------------------------------ templates


def _fixed_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _axes_in_inches(figure: Figure, left: float, bottom: float, right: float, top: float):
    """Axes with margins given in inches (no layout engine: positions are computed once)."""
    width, height = figure.get_size_inches()
    return figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))


def _label_margin(labels: Sequence[str], fontsize: float = 10.0) -> float:
    """Inches that tick labels need beside an axis (about 0.6 em a character)."""
    return 0.25 + 0.6 * fontsize / 72 * max((len(label) for label in labels), default=1)


class _MatrixTemplate:
    def __init__(self, class_names: tuple[str, ...], row_label: str, col_label: str, colour_label: str) -> None:
        size = len(class_names)
        side = max(5.0, 0.45 * size + 2.0)
        rotate = size > 6
        left = _label_margin(class_names) + 0.35
        bottom = (_label_margin(class_names) * 0.75 if rotate else 0.3) + 0.45
        self.figure = _fixed_figure(side + left + 1.3, side + bottom + 0.5)
        self.axes = _axes_in_inches(self.figure, left, bottom, 1.3, 0.5)
        colour_axes = self.figure.add_axes(
            (
                1 - 1.05 / self.figure.get_size_inches()[0],
                self.axes.get_position().y0,
                0.15 / self.figure.get_size_inches()[0],
                self.axes.get_position().height,
            )
        )
        self.image = self.axes.imshow(np.zeros((size, size)), cmap=STIFFNESS_CMAP, vmin=-1.0, vmax=1.0, aspect="auto")
        self.figure.colorbar(self.image, cax=colour_axes, label=colour_label)
        self.axes.set_xticks(
            range(size), labels=list(class_names), rotation=45 if rotate else 0, ha="right" if rotate else "center"
        )
        self.axes.set_yticks(range(size), labels=list(class_names))
        self.axes.set_xlabel(col_label)
        self.axes.set_ylabel(row_label)
        self.title = self.axes.set_title("", fontsize=11)
        # Blitting: what never changes (axes, ticks, labels, colour bar) is drawn once and kept as a background;
        # each matrix then draws only its image, the frame over it and its title.
        self.image.set_animated(True)
        self.title.set_animated(True)
        self._background = None

    def draw(self, spec: MatrixSpec) -> Figure:
        self.image.set_data(np.ma.masked_invalid(np.asarray(spec.matrix, dtype=np.float64)))
        self.title.set_text(spec.title)
        return self.figure

    def render(self, spec: MatrixSpec) -> np.ndarray:
        self.draw(spec)
        canvas = self.figure.canvas
        if self._background is None:
            canvas.draw()
            self._background = canvas.copy_from_bbox(self.figure.bbox)
        canvas.restore_region(self._background)
        for artist in (self.image, *self.axes.spines.values(), self.title):
            self.figure.draw_artist(artist)
        return np.asarray(canvas.buffer_rgba())[..., :3]


_CURVE_STYLES = {"within": ("within class", "tab:blue", "o"), "between": ("between classes", "tab:red", "s")}


class _CurveTemplate:
    def __init__(self) -> None:
        self.figure = _fixed_figure(6.4, 4.8)
        self.axes = _axes_in_inches(self.figure, 0.75, 0.6, 0.2, 0.4)
        axes = self.axes
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.grid(alpha=0.3)
        axes.set_ylim(*STIFFNESS_RANGE)
        self.lines, self.dots = {}, {}
        for side, (label, colour, marker) in _CURVE_STYLES.items():
            (self.lines[side],) = axes.plot([], [], color=colour, linewidth=1.0, alpha=0.6)
            self.dots[side] = axes.scatter([], [], color=colour, marker=marker, label=label, zorder=3)
        (self.fit,) = axes.plot(
            [], [], color="black", linewidth=1.6, gid="fit-pairs", label="least-squares fit, same-class pairs"
        )
        (self.bin_fit,) = axes.plot(
            [],
            [],
            color="black",
            linewidth=1.0,
            linestyle=":",
            gid="fit-bins",
            label="fit through bin means (bins weighted equally)",
        )
        self.xi_line = axes.axvline(0.0, color="black", linestyle="--", linewidth=1.0, gid="xi")
        self.xi_text = axes.text(0.0, 0.0, "", fontsize=9, va="bottom", gid="xi-label")
        self.note = axes.text(
            0.01, 0.98, "marker area: pairs in the bin", transform=axes.transAxes, va="top", fontsize=8, color="dimgrey"
        )
        axes.legend(loc="upper right", fontsize=8)
        self.title = axes.set_title("", fontsize=11)

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
            self.dots[side].set_sizes(4 + 140 * count[seen] / largest)
        low, high = float(edges[0]), float(edges[-1])
        pad = 0.03 * (high - low or 1.0)
        self.axes.set_xlim(low - pad, high + pad)
        for artist, line in ((self.fit, spec.fit), (self.bin_fit, spec.bin_fit)):
            visible = line is not None and math.isfinite(line.slope)
            artist.set_data(([line.low, line.high], [line.at(line.low), line.at(line.high)]) if visible else ([], []))
        self._mark_xi(spec.fit, low - pad, high + pad)
        self.axes.set_xlabel(spec.xlabel)
        self.axes.set_ylabel(spec.ylabel)
        self.title.set_text(spec.title)
        return self.figure

    def _mark_xi(self, fit: Line | None, left: float, right: float) -> None:
        """ξ as a dashed line when it lies in the plotted range; otherwise said in words, without moving the axis."""
        xi = fit.xi if fit is not None else math.nan
        inside = math.isfinite(xi) and left <= xi <= right
        self.xi_line.set_visible(inside)
        if inside:
            self.xi_line.set_xdata([xi, xi])
            self.xi_text.set_position((xi, -0.95))
            self.xi_text.set_transform(self.axes.transData)
            self.xi_text.set_ha("left" if xi < (left + right) / 2 else "right")
            self.xi_text.set_text(f" ξ = {xi:.3f} ")
            return
        self.xi_text.set_transform(self.axes.transAxes)
        self.xi_text.set_position((0.01, 0.02))
        self.xi_text.set_ha("left")
        if not math.isfinite(xi):
            self.xi_text.set_text("no ξ: the fitted line does not fall")
        elif xi > right:
            self.xi_text.set_text(f"ξ = {xi:.3f}: extrapolated, beyond the largest distance ({right:.3g}) →")
        else:
            self.xi_text.set_text(f"← ξ = {xi:.3f}: extrapolated, below the smallest distance ({left:.3g})")


def _layers_figure(spec: LayersSpec) -> Figure:
    figure = _fixed_figure(max(6.4, 0.5 * len(spec.layers) + 3.0), 4.8)
    rotate = len(spec.layers) > 4
    axes = _axes_in_inches(figure, 0.75, (_label_margin(spec.layers) * 0.75 if rotate else 0.3) + 0.45, 0.2, 0.4)
    positions = np.arange(len(spec.layers))
    axes.plot(positions, spec.within, marker="o", color="tab:blue", label="within class")
    axes.plot(positions, spec.between, marker="s", color="tab:red", label="between classes")
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xticks(
        positions, labels=list(spec.layers), rotation=45 if rotate else 0, ha="right" if rotate else "center"
    )
    axes.set_xlabel("layer")
    axes.set_ylabel("mean cosine stiffness")
    axes.set_ylim(*STIFFNESS_RANGE)
    axes.set_title(spec.title, fontsize=11)
    axes.legend(loc="best", fontsize=9)
    axes.grid(alpha=0.3)
    return figure


def _xi_bars_figure(spec: XiBarsSpec) -> Figure:
    figure = _fixed_figure(max(6.4, 0.6 * len(spec.names) + 3.0), 4.8)
    rotate = len(spec.names) > 5
    axes = _axes_in_inches(figure, 0.75, (_label_margin(spec.names) * 0.75 if rotate else 0.3) + 0.45, 0.2, 0.4)
    positions = np.arange(len(spec.names))
    heights = [v if math.isfinite(v) else 0.0 for v in spec.values]
    bars = axes.bar(positions, heights, color=["tab:grey"] + ["tab:blue"] * (len(spec.names) - 1))
    for bar, value in zip(bars, spec.values, strict=True):
        label = f"{value:.3f}" if math.isfinite(value) else "no fit"
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axes.set_xticks(
        positions, labels=list(spec.names), rotation=45 if rotate else 0, ha="right" if rotate else "center"
    )
    axes.set_xlabel("representation (input, then layers in network order)")
    axes.set_ylabel("critical distance ξ")
    axes.set_title(spec.title, fontsize=11)
    axes.grid(alpha=0.3, axis="y")
    return figure


class Painter:
    """Draws specs into figures, reusing one template per shape of figure (kept for the painter's lifetime)."""

    def __init__(self) -> None:
        self._templates: dict[tuple, Any] = {}

    def figure(self, spec: Any) -> Figure:
        """The drawn figure of ``spec`` (a template's figure: valid until the next spec of the same shape)."""
        if isinstance(spec, MatrixSpec):
            return self._matrix(spec).draw(spec)
        if isinstance(spec, CurveSpec):
            return self._template(("curve",), _CurveTemplate).draw(spec)
        builders: dict[type, Callable[[Any], Figure]] = {LayersSpec: _layers_figure, XiBarsSpec: _xi_bars_figure}
        return builders[type(spec)](spec)

    def _matrix(self, spec: MatrixSpec) -> _MatrixTemplate:
        key = ("matrix", spec.class_names, spec.row_label, spec.col_label, spec.colour_label)
        return self._template(key, lambda: _MatrixTemplate(*key[1:]))

    def _template(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._templates:
            self._templates[key] = build()
        return self._templates[key]

    def png(self, spec: Any) -> bytes:
        """``spec`` drawn and encoded as PNG."""
        buffer = io.BytesIO()
        Image.fromarray(self._pixels(spec)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def rgb(self, spec: Any) -> np.ndarray:
        """``spec`` drawn as an RGB array (H, W, 3, uint8)."""
        return self._pixels(spec).copy()

    def _pixels(self, spec: Any) -> np.ndarray:
        if isinstance(spec, MatrixSpec):
            return self._matrix(spec).render(spec)
        figure = self.figure(spec)
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3]


def render_all(painter: Painter, specs: dict[str, Any]) -> dict[str, bytes]:
    """Every spec (by tag) as PNG bytes."""
    return {tag: painter.png(spec) for tag, spec in specs.items()}


def serve(inbound=None, outbound=None) -> None:
    """The render worker's loop: read ``(job, specs)`` pickles, answer ``(job, pngs or error text)`` pickles.

    Ends at end of input (the parent closed the pipe or exited).
    """
    inbound = inbound or sys.stdin.buffer
    outbound = outbound or sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed while drawing must not corrupt the answers
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
