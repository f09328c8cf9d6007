"""The report's figures, each drawn once with matplotlib's object API (a ``Figure`` on an Agg canvas) and saved as a
PNG file. Legends lie outside the axes (below them), so that no data runs under them."""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.images.drawing import STIFFNESS_RANGE
from lightning_stiffness.images.specs import STIFFNESS_CMAP, new_figure
from lightning_stiffness.measures.fitted_lines import extrapolated
from lightning_stiffness.measures.records import DistanceMeasures
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import FITS, INPUT, MODEL, PAIRS, probe_label
from lightning_stiffness.report.runs import Run

#: Colours of the two sides, everywhere in the report.
SIDE_COLOURS = {"within": "tab:blue", "between": "tab:red"}
#: Line styles of the two kinds (losses are black or grey, dotted and dash-dotted, with their own markers).
KIND_STYLES = {"cosine": ("-", "o"), "sign": ("--", "D")}
_LOSS_STYLES = (("black", ":", "x"), ("dimgray", "-.", "^"), ("black", (0, (1, 3)), "v"), ("dimgray", (0, (5, 1)), "*"))
_BAND_ALPHA = 0.15
#: Colours of the distance spaces (input first, then the layers): none of them a side's.
SPACE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:orange", "tab:gray")


def space_colour(index: int) -> str:
    """The colour of the ``index``-th space (input space is 0)."""
    return SPACE_COLOURS[index % len(SPACE_COLOURS)]


@contextmanager
def _saved_figure(path: Path, width: float, height: float) -> Iterator[Figure]:
    """A figure to draw on, written to ``path`` when the block ends and then released."""
    with new_figure(width, height) as figure:
        yield figure
        figure.savefig(path, dpi=100)


def _legend_below(figure: Figure, handles: Sequence, ncols: int) -> None:
    """One legend for the whole figure, under its axes."""
    if handles:
        figure.legend(handles=list(handles), loc="outside lower center", ncols=ncols, fontsize=10, frameon=False)


@dataclass
class Series:
    """A line over probes (or learning rates) with its 95% band: ``low``/``high`` NaN where there is none.
    ``hollow``: points drawn as open markers (ξ extrapolated)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    colour: str | None = None
    linestyle: str = "-"
    marker: str = "o"
    hollow: list[bool] = field(default_factory=list)


def _draw_series(axes: Axes, series: Series, errorbars: bool = False) -> Line2D:
    xs, ys = np.asarray(series.xs, float), np.asarray(series.ys, float)
    low, high = np.asarray(series.low, float), np.asarray(series.high, float)
    (line,) = axes.plot(
        xs, ys, linestyle=series.linestyle, marker=series.marker, markersize=5, linewidth=1.8, color=series.colour,
        label=series.label,
    )  # fmt: skip
    colour = line.get_color()
    banded = np.isfinite(low) & np.isfinite(high)
    if errorbars:
        if banded.any():
            yerr = np.vstack([ys - low, high - ys])[:, banded]
            axes.errorbar(xs[banded], ys[banded], yerr=yerr, fmt="none", ecolor=colour, capsize=3, linewidth=1)
    elif banded.any():
        axes.fill_between(xs, low, high, where=banded, color=colour, alpha=_BAND_ALPHA, linewidth=0)
    hollow = np.asarray(series.hollow, bool) if series.hollow else np.zeros(len(xs), bool)
    if hollow.any():  # open markers over the filled ones
        axes.plot(xs[hollow], ys[hollow], linestyle="none", marker=series.marker, markersize=7, color="white")
        axes.plot(
            xs[hollow], ys[hollow], linestyle="none", marker=series.marker, markersize=7, mfc="none", color=colour
        )
    return line


# --------------------------------------------------------------------------------------------------- class matrices


def class_matrices_figure(run: Run, chosen: list[StiffnessResult], pair: str, kind: str, path: Path) -> None:
    """The class stiffness matrices of the ``chosen`` probes (at least one) side by side, each titled with its
    within/between-class stiffness, saved to ``path``.

    Raises:
        ReportError: for no probe, or a probe without the class matrix (a version-1 file that did not keep it).
    """
    if not chosen:
        raise ReportError("class_matrices_figure needs at least one probe to draw.")
    with _saved_figure(path, 4.2 * len(chosen) + 1.2, 4.9) as figure:
        images: list[AxesImage] = []
        for i, result in enumerate(chosen):
            axes = figure.add_subplot(1, len(chosen), i + 1)
            whole = result.classes[pair][kind][MODEL]
            if whole.matrix is None:
                when = probe_label(result.epoch, result.step)
                raise ReportError(f"{run.path}: the probe at {when} has no {pair} {kind} class matrix to draw.")
            matrix = np.ma.masked_invalid(whole.matrix.double().numpy())
            images.append(axes.imshow(matrix, cmap=STIFFNESS_CMAP, vmin=-1, vmax=1))
            ticks = range(result.num_classes)
            axes.set_xticks(ticks)
            axes.set_yticks(ticks)
            if result.num_classes > 12:
                axes.tick_params(labelsize=6)
            numbers = f"within {_short(whole.within)}, between {_short(whole.between)}"
            axes.set_title(f"{probe_label(result.epoch, result.step)}\n{numbers}", fontsize=11)
            rows, cols = PAIRS[pair]
            axes.set_xlabel(f"class of the {cols} example")
            if i == 0:
                axes.set_ylabel(f"class of the {rows} example")
        figure.colorbar(images[-1], ax=figure.axes, label=f"{kind} stiffness", shrink=0.8)
        figure.suptitle(f"class stiffness matrices, {pair}, {kind}", fontsize=13)


def _short(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2f}"


# ------------------------------------------------------------------------------------------ stiffness against distance


def _space_label(space: str, metric: str) -> str:
    if space == INPUT:
        return "cosine distance of the inputs (1 − cos)"
    return f"{'1 − cos' if metric == 'cosine' else 'euclidean distance'} of {space}'s outputs"


def _draw_distance_panel(axes: Axes, measures: DistanceMeasures) -> list[str]:
    """One space's curves, bands, fitted line and ξ; returns what was drawn beyond the curves ("band", "line", "xi",
    "xi extrapolated"), for the legend."""
    drawn = []
    lows, highs = [], []
    for side, colour in SIDE_COLOURS.items():
        curve = measures.curves[side]
        edges = curve.edges.double().numpy()
        lows.append(edges[0])
        highs.append(edges[-1])
        centres = (edges[1:] + edges[:-1]) / 2
        mean, count = curve.mean.double().numpy(), curve.count.numpy()
        seen = count > 0
        marker = "o" if side == "within" else "s"
        axes.plot(centres[seen], mean[seen], color=colour, marker=marker, markersize=5, linewidth=1.5)
        band = measures.bands.get(side)
        if band is not None:
            low, high = (np.asarray(end, dtype=np.float64) for end in band)
            ok = np.isfinite(low) & np.isfinite(high)
            axes.fill_between(centres, low, high, where=ok, color=colour, alpha=_BAND_ALPHA, linewidth=0)
            drawn.append("band")
    left, right = min(lows), max(highs)
    fit = measures.line_fits.get(FITS[0], {})
    xi = measures.critical_distance
    flag = extrapolated(xi, fit.get("low", math.nan), fit.get("high", math.nan))
    span = right - left or 1.0
    if flag and math.isfinite(xi) and left - 0.5 * span <= xi <= right + 0.5 * span:
        left, right = min(left, xi), max(right, xi)  # show an extrapolated ξ that is near
    pad = 0.03 * (right - left or 1.0)
    axes.set_xlim(left - pad, right + pad)
    intercept, slope = fit.get("intercept", math.nan), fit.get("slope", math.nan)
    on_axis = math.isfinite(xi) and left - pad <= xi <= right + pad
    if math.isfinite(intercept) and math.isfinite(slope):
        a, b = fit["low"], fit["high"]
        axes.plot([a, b], [intercept + slope * a, intercept + slope * b], color="black", linewidth=1.6)
        drawn.append("line")
        if flag and on_axis:
            end = b if xi > b else a
            axes.plot([end, xi], [intercept + slope * end, 0.0], color="black", linewidth=1.0, linestyle=":")
    if on_axis:
        axes.axvline(xi, color="black", linestyle=":" if flag else "--", linewidth=1.0)
        drawn.append("xi extrapolated" if flag else "xi")
        text = f" ξ = {xi:.3f}" + (" (extrapolated)" if flag else "") + " "
        axes.text(xi, -0.97, text, fontsize=9, ha="left" if xi < (left + right) / 2 else "right", va="bottom")
    elif math.isfinite(xi):
        if xi > right:
            text, x, ha = f"ξ = {xi:.3f} (extrapolated, off the axis) →", 0.99, "right"
        else:
            text, x, ha = f"← ξ = {xi:.3f} (extrapolated, off the axis)", 0.01, "left"
        axes.text(x, 0.03, text, fontsize=9, ha=ha, transform=axes.transAxes)
    else:
        axes.text(0.01, 0.03, "no ξ: the fitted line does not fall", fontsize=9, transform=axes.transAxes)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_ylim(*STIFFNESS_RANGE)
    axes.grid(alpha=0.3)
    return drawn


def distance_figure(run: Run, chosen: list[StiffnessResult], pair: str, path: Path) -> None:
    """Stiffness against distance, the paper's central figure: a row per ``chosen`` probe, a column per space (the
    inputs, then each recorded layer), the mean stiffness of same-class and different-class pairs in each distance
    bin with their 95% bands where the results hold them, the least-squares line through the same-class pairs and
    its zero crossing ξ (dotted, and said, when extrapolated). Saved to ``path``."""
    spaces = [INPUT, *chosen[-1].representation_layers]
    rows, cols = len(chosen), len(spaces)
    with _saved_figure(path, 4.3 * cols + 0.6, 3.2 * rows + 1.3) as figure:
        grid = figure.subplots(rows, cols, squeeze=False, sharey=True)
        drawn: set[str] = set()
        for r, result in enumerate(chosen):
            for c, space in enumerate(spaces):
                axes = grid[r][c]
                measures = result.spaces[pair].get(space)
                if measures is None:
                    axes.text(0.5, 0.5, f"{space} not recorded", ha="center", transform=axes.transAxes)
                    axes.set_axis_off()
                    continue
                drawn.update(_draw_distance_panel(axes, measures))
                if r == 0:
                    axes.set_title("input space" if space == INPUT else f"layer {space}", fontsize=12)
                if r == rows - 1 or rows == 1:
                    axes.set_xlabel(_space_label(space, result.distance_metric), fontsize=10)
                if c == 0:
                    axes.set_ylabel(f"{probe_label(result.epoch, result.step)}\n{result.xi_kind} stiffness")
        handles: list = [
            Line2D([], [], color=SIDE_COLOURS["within"], marker="o", markersize=4, label="same class (bin mean)"),
            Line2D([], [], color=SIDE_COLOURS["between"], marker="s", markersize=4, label="different classes"),
        ]
        if "line" in drawn:
            handles.append(Line2D([], [], color="black", linewidth=1.6, label="least-squares line, same-class pairs"))
        if "xi" in drawn:
            handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.0, label="ξ: where it crosses 0"))
        if "xi extrapolated" in drawn:
            handles.append(
                Line2D([], [], color="black", linestyle=":", linewidth=1.0, label="ξ extrapolated (beyond the pairs)")
            )
        if "band" in drawn:
            handles.append(Patch(color="grey", alpha=0.3, label="95% bootstrap interval of each bin's mean"))
        _legend_below(figure, handles, ncols=3)
        figure.suptitle(f"stiffness against distance, {pair}", fontsize=13)


# ---------------------------------------------------------------------------------------------- over training


def _losses_axes(axes: Axes, losses: dict[str, tuple[list[int], list[float]]], suffix: str = "") -> list:
    """The losses on a second y-axis (only when there are some), the stretch where a validation loss rises above its
    minimum shaded; returns the legend handles."""
    if not losses:
        return []
    twin = axes.twinx()
    handles: list = []
    for (tag, (xs, ys)), (colour, style, marker) in zip(sorted(losses.items()), _cycle(_LOSS_STYLES), strict=False):
        (line,) = twin.plot(
            xs, ys, color=colour, linestyle=style, marker=marker, markersize=5, label=f"loss: {tag}{suffix}"
        )
        handles.append(line)
        if "val" in tag and len(ys) > 1:
            best = int(np.argmin(ys))
            if best < len(ys) - 1:
                handles.append(axes.axvspan(xs[best], xs[-1], color="orange", alpha=0.12, label=f"{tag} rising"))
    twin.set_ylabel("loss")
    return handles


def _cycle(styles: Sequence) -> Iterator:
    while True:
        yield from styles


def training_figure(
    panels: dict[str, list[Series]],
    losses: dict[str, tuple[list[int], list[float]]],
    title: str,
    path: Path,
    loss_suffix: str = "",
) -> None:
    """Within/between-class stiffness against the global step, a panel per kind (``panels``: kind -> its series,
    each with its band), the losses on a second axis of each (none without losses), one legend below; saved to
    ``path``. ``loss_suffix`` ends the losses' labels."""
    with _saved_figure(path, 8.5, 3.6 * len(panels) + 1.6) as figure:
        grid = figure.subplots(len(panels), 1, sharex=True, squeeze=False)
        handles: dict[str, Any] = {}
        loss_handles: dict[str, Any] = {}
        banded = False
        for row, (kind, series) in zip(grid, panels.items(), strict=True):
            axes = row[0]
            for line in [_draw_series(axes, s) for s in series]:
                handles.setdefault(str(line.get_label()), line)
            for line in _losses_axes(axes, losses, loss_suffix):
                loss_handles.setdefault(str(line.get_label()), line)
            banded = banded or any(np.isfinite(np.asarray(s.low, float)).any() for s in series)
            axes.axhline(0, color="grey", linewidth=0.8)
            axes.set_ylim(*STIFFNESS_RANGE)
            axes.set_ylabel(f"{kind} stiffness")
            axes.grid(alpha=0.3)
        grid[-1][0].set_xlabel("global step (0: initialisation)")
        figure.suptitle(title, fontsize=12)
        if banded:
            handles["band"] = Patch(color="grey", alpha=0.3, label="95% interval")
        _legend_below(figure, [*handles.values(), *loss_handles.values()], ncols=3)


def xi_figure(series: list[Series], title: str, path: Path) -> None:
    """The critical distance ξ against the global step, a series per space, to ``path``."""
    with _saved_figure(path, 8.5, 5.2) as figure:
        axes = figure.add_subplot()
        handles: list = [_draw_series(axes, s) for s in series]
        if any(any(s.hollow) for s in series):
            handles.append(
                Line2D([], [], linestyle="none", marker="o", mfc="none", color="black", label="extrapolated")
            )
        if any(np.isfinite(np.asarray(s.low, float)).any() for s in series):
            handles.append(Patch(color="grey", alpha=0.3, label="95% interval"))
        axes.set_xlabel("global step (0: initialisation)")
        axes.set_ylabel("critical distance ξ")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        _legend_below(figure, handles, ncols=4)


def lr_figure(xi: list[Series], sides: list[Series], title: str, note: str, path: Path) -> None:
    """ξ (top) and within/between-class stiffness (bottom) at the last probe against the learning rate, with error
    bars, each panel with its legend on its right; to ``path``."""
    with _saved_figure(path, 9, 8.5) as figure:
        top, bottom = figure.subplots(2, 1, sharex=True)
        for axes, series in ((top, xi), (bottom, sides)):
            for i, s in enumerate(series):  # each series a little apart, so that error bars at one lr do not hide
                shift = 10 ** (0.012 * (i - (len(series) - 1) / 2))
                _draw_series(axes, replace(s, xs=[x * shift for x in s.xs]), errorbars=True)
            axes.set_xscale("log")
            axes.grid(alpha=0.3)
            axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=10, frameon=False)
        lrs = sorted({float(x) for s in [*xi, *sides] for x in s.xs})
        bottom.xaxis.set_major_locator(FixedLocator(lrs))
        bottom.xaxis.set_major_formatter(FixedFormatter([f"{lr:g}" for lr in lrs]))
        bottom.xaxis.set_minor_formatter(NullFormatter())
        top.set_ylabel("critical distance ξ")
        bottom.axhline(0, color="grey", linewidth=0.8)
        bottom.set_ylabel("stiffness")
        bottom.set_xlabel("learning rate")
        figure.suptitle(f"{title}\n{note}", fontsize=12)
