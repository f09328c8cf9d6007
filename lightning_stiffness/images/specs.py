"""A probe's figures: its result turned into plain figure specs (NumPy and strings), drawn by
:mod:`~lightning_stiffness.images.drawing`, usually in the render worker of
:mod:`~lightning_stiffness.images.render_worker`.

No pyplot: figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas, so nothing depends on a display.
Every spec is one of the classes of :data:`ImageSpec`, the union the drawing, the render worker and the image writer
take (defined beside the classes, in the torch-free :mod:`~lightning_stiffness.images.drawing`).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_stiffness.images.drawing import (
    DPI,
    STIFFNESS_CMAP,
    CurveSpec,
    ImageSpec,
    LayersSpec,
    Line,
    MatrixSpec,
    Painter,
    XiBarsSpec,
)
from lightning_stiffness.measures.functional import DistanceCurve, within_between
from lightning_stiffness.names import (
    FITS,
    INPUT,
    MODEL,
    PAIRS,
    PREFIX,
    by_layer_tag,
    class_matrix_tag,
    critical_distance_by_layer_tag,
    dataset_class_matrix_tag,
    distance_curve_tag,
    group_matrix_tag,
    probe_label,
)

if TYPE_CHECKING:
    from torch import Tensor

    from lightning_stiffness.measures.result import StiffnessResult

__all__ = ["DPI", "STIFFNESS_CMAP", "ImageSpec", "new_figure", "probe_images", "probe_specs"]


@contextmanager
def new_figure(width: float, height: float) -> Iterator[Figure]:
    """A constrained-layout figure on an Agg canvas, cleared when the block ends (also on an error); for the report,
    whose figures are drawn once."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    try:
        yield figure
    finally:
        figure.clear()


def _line(fit: dict[str, float] | None) -> Line | None:
    return Line(**fit) if fit else None


def _shared_range(curves: list[dict[str, DistanceCurve]]) -> tuple[float, float]:
    """The distances covered by any of ``curves`` (one distance space, every pair): one axis for all of them."""
    edges = [curve["within"].edges for curve in curves]
    return min(float(e[0]) for e in edges), max(float(e[-1]) for e in edges)


def _band(bands: dict[str, tuple[Any, Any]] | None, side: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not bands or side not in bands:
        return None
    low, high = bands[side]
    return low.double().numpy(), high.double().numpy()


def _curve_spec(result: "StiffnessResult", pair: str, space: str, xlim: tuple[float, float], when: str) -> CurveSpec:
    """The distance curve of one pair in one space (input or a layer) with its fitted lines and bootstrap band."""
    measures = result.spaces[pair][space]
    within, between = measures.curves["within"], measures.curves["between"]
    layer = None if space == INPUT else space
    stiffness = f"{result.xi_kind} stiffness"
    return CurveSpec(
        edges=within.edges.double().numpy(),
        within_mean=within.mean.double().numpy(),
        within_count=within.count.numpy(),
        between_mean=between.mean.double().numpy(),
        between_count=between.count.numpy(),
        fit=_line(measures.line_fits.get(FITS[0])),
        bin_fit=_line(measures.line_fits.get(FITS[1])),
        title=f"{pair} ({when})",  # the drawing adds ξ as a second line; the space is on the distance axis
        xlabel=f"{result.distance_metric} distance in {layer}" if layer else "input distance (1 − cos)",
        ylabel=stiffness,
        within_band=_band(measures.bands, "within"),
        between_band=_band(measures.bands, "between"),
        xlim=xlim,
    )


def _matrix_spec(result: "StiffnessResult", pair: str, kind: str, names: tuple[str, ...], when: str) -> MatrixSpec:
    rows, cols = PAIRS[pair]
    whole = result.classes[pair][kind][MODEL]
    if whole.matrix is None:
        raise ValueError(
            f"the result has no {pair} {kind} class matrix to draw (a version-1 file that did not keep it)."
        )
    return MatrixSpec(
        matrix=whole.matrix.double().numpy(),
        class_names=names,
        title=f"{kind}, {pair} ({when})\nwithin {whole.within:.2f}, between {whole.between:.2f}",
        row_label=f"{rows} class",
        col_label=f"{cols} class",
    )


def probe_specs(result: "StiffnessResult", class_names: Sequence[str], prefix: str = PREFIX) -> dict[str, ImageSpec]:
    """Every figure of one probe, by tag (see the README's table of logged names), as picklable specs."""
    when = probe_label(result.epoch, result.step)
    names = tuple(str(name) for name in class_names)
    specs: dict[str, ImageSpec] = {}
    # The curves of one distance space share their axis: pairs compare at a glance, and the worker draws the axis once.
    spaces = list(next(iter(result.spaces.values()), {}))
    ranges = {space: _shared_range([result.spaces[pair][space].curves for pair in result.pairs]) for space in spaces}
    for pair in result.pairs:
        for kind in result.kinds:
            specs[class_matrix_tag(pair, kind, prefix)] = _matrix_spec(result, pair, kind, names, when)
        for space in spaces:
            specs[distance_curve_tag(pair, space, prefix)] = _curve_spec(result, pair, space, ranges[space], when)
        if len(spaces) > 1:
            specs[critical_distance_by_layer_tag(pair, prefix)] = XiBarsSpec(
                names=tuple(spaces),
                values=tuple(result.spaces[pair][space].critical_distance for space in spaces),
                title=f"{pair} ({when})",
                extrapolated=tuple(result.spaces[pair][space].extrapolated for space in spaces),
            )
        own = {layer: m for layer, m in result.classes[pair].get("cosine", {}).items() if layer != MODEL}
        if own:
            specs[by_layer_tag(pair, prefix)] = LayersSpec(
                layers=tuple(own),
                within=tuple(m.within for m in own.values()),
                between=tuple(m.between for m in own.values()),
                title=f"{pair} ({when})",
            )
    specs.update(group_specs(result, when, prefix))
    return specs


def probe_images(result: "StiffnessResult", class_names: Sequence[str], prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """Every image of one probe, by tag, as RGB arrays (H, W, 3, uint8), drawn in this process."""
    painter = Painter()
    return {tag: painter.rgb(spec) for tag, spec in probe_specs(result, class_names, prefix).items()}


def dataset_specs(
    matrix: "Tensor", class_names: Sequence[str], epoch: int, step: int, prefix: str = PREFIX
) -> dict[str, MatrixSpec]:
    """The whole training set's [C, C] cosine class matrix (every pair, self-pairs excluded) as an image spec."""
    within, between = within_between(matrix)
    return {
        dataset_class_matrix_tag(prefix): MatrixSpec(
            matrix=matrix.double().cpu().numpy(),
            class_names=tuple(str(name) for name in class_names),
            title=f"cosine, training set ({probe_label(epoch, step)})\nwithin {within:.2f}, between {between:.2f}",
            row_label="train class",
            col_label="train class",
        )
    }


def group_specs(result: "StiffnessResult", when: str, prefix: str = PREFIX) -> dict[str, MatrixSpec]:
    """With class groups: each pair and kind's group x group stiffness matrix (self-pairs excluded), by tag."""
    specs = {}
    for pair, by_kind in result.groups.items():
        rows, cols = PAIRS[pair]
        for kind, groups in by_kind.items():
            inside, between = groups.between_class_within_group, groups.between_groups
            specs[group_matrix_tag(pair, kind, prefix)] = MatrixSpec(
                matrix=groups.matrix.double().numpy(),
                class_names=tuple(result.group_names),
                title=f"{kind} by group, {pair} ({when})\nin a group {inside:.2f}, across groups {between:.2f}",
                row_label=f"{rows} group",
                col_label=f"{cols} group",
            )
    return specs
