"""Figures as RGB arrays (H, W, 3, uint8), built with matplotlib's object API.

No pyplot: figures are created from :class:`matplotlib.figure.Figure` on an Agg canvas and released after rendering,
so nothing accumulates in a long run and nothing depends on a display.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

if TYPE_CHECKING:
    from lightning_stiffness.measure import StiffnessResult

from lightning_stiffness.functional import DistanceCurve
from lightning_stiffness.names import (
    PREFIX,
    by_layer_tag,
    class_matrix_tag,
    critical_distance_by_layer_tag,
    distance_curve_tag,
    kind_key,
    layer_key,
    layer_kind_key,
)

DPI = 100
#: Diverging colour map for stiffness, fixed to [-1, 1] so that colours mean the same thing in every image.
STIFFNESS_CMAP = "RdBu_r"


@contextmanager
def new_figure(width: float, height: float) -> Iterator[Figure]:
    """A constrained-layout figure on an Agg canvas, cleared when the block ends (also on an error)."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    try:
        yield figure
    finally:
        figure.clear()


def _to_rgb(figure: Figure) -> np.ndarray:
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def class_matrix_image(matrix: Tensor, class_names: Sequence[str], title: str) -> np.ndarray:
    """Heatmap of a class stiffness matrix, rows and columns named, values written in each cell up to 12 classes."""
    values = matrix.detach().cpu().double().numpy()
    size = len(class_names)
    side = max(6.0, 0.45 * size + 2.5)
    with new_figure(side + 1.0, side) as figure:
        axes = figure.add_subplot()
        image = axes.imshow(np.ma.masked_invalid(values), cmap=STIFFNESS_CMAP, vmin=-1.0, vmax=1.0)
        axes.set_xticks(
            range(size), labels=list(class_names), rotation=45 if size > 6 else 0, ha="right" if size > 6 else "center"
        )
        axes.set_yticks(range(size), labels=list(class_names))
        axes.set_xlabel("class of j")
        axes.set_ylabel("class of i")
        axes.set_title(title, fontsize=11)
        if size <= 12:
            for a in range(size):
                for b in range(size):
                    value = values[a, b]
                    text = "–" if math.isnan(value) else f"{value:.2f}"
                    axes.text(
                        b, a, text, ha="center", va="center", fontsize=8, color="white" if abs(value) > 0.6 else "black"
                    )
        figure.colorbar(image, ax=axes, label="stiffness", shrink=0.85)
        return _to_rgb(figure)


def distance_curve_image(
    curves: dict[str, DistanceCurve], xi: float, title: str, ylabel: str, xlabel: str = "input distance (1 − cos)"
) -> np.ndarray:
    """Mean stiffness against distance for within-class and between-class pairs, with xi marked."""
    with new_figure(6.4, 4.8) as figure:
        axes = figure.add_subplot()
        styles = {"within": ("within class", "tab:blue", "o"), "between": ("between classes", "tab:red", "s")}
        for side, curve in curves.items():
            label, colour, marker = styles[side]
            centres = ((curve.edges[1:] + curve.edges[:-1]) / 2).numpy()
            axes.plot(centres, curve.mean.numpy(), marker=marker, color=colour, label=label, markersize=4)
        axes.axhline(0.0, color="grey", linewidth=0.8)
        if math.isfinite(xi):
            axes.axvline(xi, color="black", linestyle="--", linewidth=1.0, label=f"ξ = {xi:.3f}")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=11)
        axes.legend(loc="best", fontsize=9)
        axes.grid(alpha=0.3)
        return _to_rgb(figure)


def layer_stiffness_image(layers: Sequence[str], within: Sequence[float], between: Sequence[float], title: str):
    """Within-class and between-class stiffness of each layer's own gradients, in network order."""
    with new_figure(max(6.4, 0.5 * len(layers) + 3.0), 4.8) as figure:
        axes = figure.add_subplot()
        positions = np.arange(len(layers))
        axes.plot(positions, within, marker="o", color="tab:blue", label="within class")
        axes.plot(positions, between, marker="s", color="tab:red", label="between classes")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_xticks(positions, labels=list(layers), rotation=45 if len(layers) > 4 else 0, ha="right")
        axes.set_xlabel("layer")
        axes.set_ylabel("mean cosine stiffness")
        axes.set_ylim(-1.05, 1.05)
        axes.set_title(title, fontsize=11)
        axes.legend(loc="best", fontsize=9)
        axes.grid(alpha=0.3)
        return _to_rgb(figure)


def critical_distance_by_layer_image(names: Sequence[str], values: Sequence[float], title: str) -> np.ndarray:
    """Stiff-domain size xi in input space and in each layer's representation, in network order."""
    with new_figure(max(6.4, 0.6 * len(names) + 3.0), 4.8) as figure:
        axes = figure.add_subplot()
        positions = np.arange(len(names))
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        bars = axes.bar(positions, heights, color=["tab:grey"] + ["tab:blue"] * (len(names) - 1))
        for bar, value in zip(bars, values, strict=True):
            label = f"{value:.3f}" if math.isfinite(value) else "no fit"
            axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        axes.set_xticks(positions, labels=list(names), rotation=45 if len(names) > 5 else 0, ha="right")
        axes.set_xlabel("representation (input, then layers in network order)")
        axes.set_ylabel("critical distance ξ")
        axes.set_title(title, fontsize=11)
        axes.grid(alpha=0.3, axis="y")
        return _to_rgb(figure)


def probe_images(result: "StiffnessResult", class_names: Sequence[str], prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """Every image of one probe, by tag (see the README's table of logged names)."""
    when = f"epoch {result.epoch}, step {result.step}"
    stiffness = f"{result.xi_kind} stiffness"
    images = {}
    for pair in result.pairs:
        for kind in result.kinds:
            images[class_matrix_tag(pair, kind, prefix)] = class_matrix_image(
                result.class_matrices[kind_key(pair, kind)], class_names, f"{kind} stiffness, {pair} ({when})"
            )
        images[distance_curve_tag(pair, prefix=prefix)] = distance_curve_image(
            result.curves[pair],
            result.critical_distance[pair],
            f"{stiffness} against input distance, {pair} ({when})",
            f"mean {stiffness}",
        )
        for layer in result.representation_layers:
            images[distance_curve_tag(pair, layer, prefix)] = distance_curve_image(
                result.layer_curves[layer_key(pair, layer)],
                result.layer_critical_distance[layer_key(pair, layer)],
                f"{stiffness} against distance in {layer}, {pair} ({when})",
                f"mean {stiffness}",
                xlabel=f"{result.distance_metric} distance between outputs of {layer}",
            )
        if result.representation_layers:
            images[critical_distance_by_layer_tag(pair, prefix)] = critical_distance_by_layer_image(
                ["input", *result.representation_layers],
                [result.critical_distance[pair]]
                + [result.layer_critical_distance[layer_key(pair, layer)] for layer in result.representation_layers],
                f"stiff-domain size by layer, {pair} ({when})",
            )
        if result.gram_layers and "cosine" in result.kinds:
            images[by_layer_tag(pair, prefix)] = layer_stiffness_image(
                result.gram_layers,
                [result.layer_within_class[layer_kind_key(pair, "cosine", layer)] for layer in result.gram_layers],
                [result.layer_between_class[layer_kind_key(pair, "cosine", layer)] for layer in result.gram_layers],
                f"cosine stiffness by layer, {pair} ({when})",
            )
    return images
