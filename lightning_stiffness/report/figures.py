"""The report's figures, each drawn once with matplotlib and saved as a PNG file."""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.images.specs import STIFFNESS_CMAP, new_figure
from lightning_stiffness.measures.intervals import interval_series
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT, KINDS, MODEL, PAIRS, SIDES, probe_label
from lightning_stiffness.report.runs import Run


@contextmanager
def _saved_figure(path: Path, width: float, height: float) -> Iterator[Figure]:
    """A figure to draw on, written to ``path`` when the block ends and then released."""
    with new_figure(width, height) as figure:
        yield figure
        figure.savefig(path, dpi=100)


def class_matrices_figure(run: Run, chosen: list[StiffnessResult], pair: str, kind: str, path: Path) -> None:
    """The class stiffness matrices of the ``chosen`` probes (at least one) side by side, saved to ``path``.

    Raises:
        ReportError: for no probe, or a probe without the class matrix (a version-1 file that did not keep it).
    """
    if not chosen:
        raise ReportError("class_matrices_figure needs at least one probe to draw.")
    with _saved_figure(path, 4.2 * len(chosen) + 1.2, 4.6) as figure:
        images: list[AxesImage] = []
        for i, result in enumerate(chosen):
            axes = figure.add_subplot(1, len(chosen), i + 1)
            matrix = result.classes[pair][kind][MODEL].matrix
            if matrix is None:
                when = probe_label(result.epoch, result.step)
                raise ReportError(f"{run.path}: the probe at {when} has no {pair} {kind} class matrix to draw.")
            images.append(
                axes.imshow(np.ma.masked_invalid(matrix.double().numpy()), cmap=STIFFNESS_CMAP, vmin=-1, vmax=1)
            )
            ticks = range(result.num_classes)
            axes.set_xticks(ticks)
            axes.set_yticks(ticks)
            axes.set_title(probe_label(result.epoch, result.step), fontsize=10)
            rows, cols = PAIRS[pair]
            axes.set_xlabel(f"class of the {cols} example")
            if i == 0:
                axes.set_ylabel(f"class of the {rows} example")
        figure.colorbar(images[-1], ax=figure.axes, label=f"{kind} stiffness", shrink=0.8)
        figure.suptitle(f"class stiffness matrices, {pair}")


def _losses_axes(run: Run, axes) -> None:
    twin = axes.twinx()
    for tag, points in sorted(run.losses.items()):
        xs = [s for s, _ in points]
        twin.plot(xs, [v for _, v in points], linestyle=":", marker=".", label=tag)
        if "val" in tag and len(points) > 1:
            values = [v for _, v in points]
            best = int(np.argmin(values))
            if best < len(values) - 1:
                axes.axvspan(xs[best], xs[-1], color="orange", alpha=0.12, label="validation loss rising")
    twin.set_ylabel("loss")
    if run.losses:
        twin.legend(loc="upper right", fontsize=8)


def stiffness_figure(run: Run, pair: str, path: Path) -> None:
    """Within/between-class stiffness against the global step, with 95% bands and the run's losses, to ``path``."""
    with _saved_figure(path, 8, 4.8) as figure:
        axes = figure.add_subplot()
        xs = run.steps
        for kind, style in zip(KINDS, ("-", "--"), strict=True):
            if kind not in run.results[-1].kinds:
                continue
            for side, colour in zip(SIDES, ("tab:blue", "tab:red"), strict=True):
                measures = [r.classes[pair][kind][MODEL] for r in run.results]
                values = [m.value(side) for m in measures]
                axes.plot(xs, values, style, marker="o", markersize=3, color=colour, label=f"{kind}, {side} class")
                low, high = interval_series([m.intervals.get(side) for m in measures])  # 95% bootstrap
                axes.fill_between(xs, low, high, color=colour, alpha=0.12, linewidth=0)
        _losses_axes(run, axes)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xlabel("global step (0: initialisation)")
        axes.set_ylabel("stiffness")
        axes.set_title(f"within/between-class stiffness, {pair}")
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(alpha=0.3)


def _xi_series(run: Run, pair: str) -> dict[str, list[float]]:
    """Space (input, then the last probe's layers) -> xi at each probe (NaN where a probe lacks the space)."""
    spaces = [INPUT, *run.results[-1].representation_layers]
    return {
        space: [_space_value(r, pair, space, "critical_distance", math.nan) for r in run.results] for space in spaces
    }


def _space_value(result: StiffnessResult, pair: str, space: str, name: str, missing):
    """One field of a probe's measures in ``space``, or ``missing`` where the probe has none there."""
    measures = result.spaces[pair].get(space)
    return missing if measures is None else getattr(measures, name)


def xi_figure(run: Run, pair: str, path: Path) -> None:
    """The critical distance ξ against the global step, for the input and each recorded layer, to ``path``."""
    with _saved_figure(path, 8, 4.8) as figure:
        axes = figure.add_subplot()
        for name, values in _xi_series(run, pair).items():
            (line,) = axes.plot(run.steps, values, marker="o", markersize=3, label=name)
            low, high = interval_series([_space_value(r, pair, name, "interval", None) for r in run.results])
            axes.fill_between(run.steps, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
        title = f"stiff-domain size against training, {pair} (same-class pairs)"
        _label_xi_axes(axes, "global step (0: initialisation)", title)


def lr_figure(runs: list[Run], lrs: list[float], pair: str, path: Path) -> None:
    """ξ at each run's last probe against its learning rate ``lrs``, to ``path``."""
    with _saved_figure(path, 7, 4.8) as figure:
        axes = figure.add_subplot()
        order = np.argsort(lrs)
        series = [_xi_series(runs[i], pair) for i in order]
        for name in series[0]:
            values = [s.get(name, [math.nan])[-1] for s in series]
            axes.plot([lrs[i] for i in order], values, marker="o", label=name)
        axes.set_xscale("log")
        title = f"stiff-domain size against learning rate, {pair}"
        _label_xi_axes(axes, "learning rate", title, " at the last probe")


def _label_xi_axes(axes, xlabel: str, title: str, ylabel_note: str = "") -> None:
    """Labels, legend and grid of a critical-distance plot."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel("critical distance ξ" + ylabel_note)
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
