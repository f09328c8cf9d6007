"""One probe's measures, from the Gram matrix of its examples to the numbers and curves that get logged.

Pure PyTorch: the callback computes a :class:`~lightning_stiffness.measures.result.StiffnessResult` with
:func:`measure_stiffness` and writes it out; under DDP each process holds some rows of the Gram matrix
(:class:`GramRows`) and the torchmetrics classes of :mod:`~lightning_stiffness.measures.metrics` reduce them.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_stiffness.measures.fitted_lines import line_fits
from lightning_stiffness.measures.functional import (
    DistanceCurve,
    LineFitSums,
    distance_bin_edges,
    pairwise_distances,
    within_between,
)
from lightning_stiffness.measures.metrics import (
    ClassStiffness,
    GradientAlignment,
    StiffnessByDistance,
    block_stiffness,
)
from lightning_stiffness.measures.records import ClassMeasures, DistanceMeasures
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import DISTANCE_METRICS, INPUT, KINDS, MODEL, PAIRS, SIDES, DistanceMetric, xi_kind


@dataclass
class GramRows:
    """The rows of a probe's Gram matrix that this process holds.

    Attributes:
        values: [R, T] rows of the Gram matrix over all T probe examples.
        rows: [R] indices (among the T examples) of those rows.
        sq_norms: [T] squared gradient norms of all T examples (the Gram matrix's diagonal).
    """

    values: Tensor
    rows: Tensor
    sq_norms: Tensor

    @classmethod
    def whole(cls, gram: Tensor) -> "GramRows":
        return cls(gram, torch.arange(gram.shape[0], device=gram.device), torch.diagonal(gram))


@dataclass(frozen=True)
class _Settings:
    """What every pair is measured with."""

    kinds: tuple[str, ...]
    num_classes: int
    num_distance_bins: int
    distance_metric: str  # narrowed where used (:func:`_distance_metric`): only layers' distances need it
    sync: bool
    device: torch.device

    def metric(self, metric_class: type, *args: Any) -> Any:
        return metric_class(*args, sync_on_compute=self.sync).to(self.device)


@dataclass
class _PairBlock:
    """One pair of probe sets, as far as this process holds its rows."""

    pair: str
    rows: slice  # the row set's examples among all probe examples
    cols: slice  # the column set's
    mine: Tensor  # which of this process's Gram rows belong to the row set
    ids: Tensor  # their indices among all probe examples
    labels_r: Tensor
    labels_c: Tensor

    @property
    def same_set(self) -> bool:
        return self.rows == self.cols

    @property
    def local(self) -> Tensor:
        """This process's rows, counted within the row set."""
        return self.ids - self.rows.start

    @property
    def self_pairs(self) -> tuple[Tensor | None, Tensor | None]:
        """Example indices of rows and columns (pairs with equal ones are left out), when a set meets itself."""
        if not self.same_set:
            return None, None
        return self.ids, torch.arange(self.cols.start, self.cols.stop, device=self.ids.device)

    def of(self, source: GramRows) -> tuple[Tensor, Tensor, Tensor]:
        """This process's rows of the pair's block of ``source``, with the squared norms of its rows and columns."""
        return source.values[self.mine][:, self.cols], source.sq_norms[self.ids], source.sq_norms[self.cols]


def measure_stiffness(
    gram: Tensor | GramRows,
    inputs: dict[str, Tensor],
    labels: dict[str, Tensor],
    indices: dict[str, Tensor],
    *,
    kinds: tuple[str, ...] = KINDS,
    num_classes: int,
    num_distance_bins: int = 20,
    epoch: int = 0,
    step: int = 0,
    layer_grams: dict[str, Tensor | GramRows] | None = None,
    representations: dict[str, dict[str, Tensor]] | None = None,
    distance_metric: str = "cosine",
    full_gram: Tensor | None = None,
    sync: bool = False,
) -> StiffnessResult:
    """Measure every pair of probe sets from the Gram matrix of all probe examples, or from some of its rows.

    Class matrices, distance curves and critical distances accumulate through :class:`ClassStiffness` and
    :class:`StiffnessByDistance`, so that processes holding different rows of the Gram matrix (``GramRows``) get the
    same results as one process holding all of it, once ``sync`` reduces the metrics across processes.

    Args:
        gram: [T, T] Gram matrix of the probe sets' examples, concatenated in the order of ``inputs``, or the
            :class:`GramRows` this process holds.
        inputs: probe set name (``"train"``, optionally ``"val"``) -> its inputs (for input-space distances).
        labels: probe set name -> integer labels.
        indices: probe set name -> dataset indices (recorded, not used).
        kinds: stiffness kinds to measure.
        num_classes: C.
        num_distance_bins: bins of the stiffness-against-distance curves (equal width between the smallest and
            largest distance of the pair's distinct examples).
        epoch: recorded in the result.
        step: recorded in the result.
        layer_grams: per-layer Gram matrices or rows (summing to ``gram``), for per-layer within/between stiffness,
            where each layer's cosine stiffness uses that layer's own gradient norms.
        representations: probe set name -> layer name -> [n, D] outputs of that layer, for stiffness against
            distance in each layer's representation.
        distance_metric: metric of the representation distances, ``"cosine"`` or ``"euclidean"``.
        full_gram: the whole [T, T] Gram matrix, for the stiffness matrices of the result (default: ``gram`` when it
            is whole; otherwise they are left out).
        sync: reduce the metrics across processes (every process must call this with its own rows).

    Raises:
        ValueError: when ``gram`` does not have one column and one norm per probe example.
    """
    offsets, start = {}, 0
    for name, x in inputs.items():
        offsets[name], start = slice(start, start + x.shape[0]), start + x.shape[0]
    rows_of = gram if isinstance(gram, GramRows) else GramRows.whole(gram)
    if rows_of.values.dim() != 2 or rows_of.values.shape[1] != start or rows_of.sq_norms.shape != (start,):
        raise ValueError(f"`gram` must have {start} columns and {start} norms, got {tuple(rows_of.values.shape)}.")
    if full_gram is None and not isinstance(gram, GramRows):
        full_gram = gram
    full = full_gram.detach().cpu() if full_gram is not None else None
    device = rows_of.values.device
    settings = _Settings(tuple(kinds), num_classes, num_distance_bins, distance_metric, sync, device)
    result = StiffnessResult(
        epoch=epoch,
        step=step,
        kinds=tuple(kinds),
        xi_kind=xi_kind(kinds),
        num_classes=num_classes,
        labels={k: v.cpu() for k, v in labels.items()},
        indices={k: v.cpu() for k, v in indices.items()},
        distance_metric=distance_metric,
    )
    layers = list(next(iter(representations.values()), {})) if representations else []
    if INPUT in layers:
        raise ValueError(f"`representations` may not name a layer {INPUT!r}: that is input space's name.")
    layer_rows = {
        layer: g if isinstance(g, GramRows) else GramRows.whole(g) for layer, g in (layer_grams or {}).items()
    }
    all_labels = torch.cat([labels[name].to(device) for name in inputs])
    for pair, (rows, cols) in PAIRS.items():
        if rows in inputs and cols in inputs:
            mine = (rows_of.rows >= offsets[rows].start) & (rows_of.rows < offsets[rows].stop)
            ids = rows_of.rows[mine]
            block = _PairBlock(
                pair, offsets[rows], offsets[cols], mine, ids, all_labels[ids], all_labels[offsets[cols]]
            )
            result.classes[pair] = _class_measures(block, rows_of, layer_rows, full, settings)
            result.spaces[pair] = _distance_measures(block, rows_of, inputs, representations or {}, layers, settings)
    for name, span in offsets.items():
        mine = (rows_of.rows >= span.start) & (rows_of.rows < span.stop)
        alignment = settings.metric(GradientAlignment)
        alignment.update(rows_of.values[mine][:, span], rows_of.sq_norms[rows_of.rows[mine]])
        result.gradient_coherence[name], result.gradient_diversity[name] = alignment.compute()
    return result


def _class_matrix(block: _PairBlock, source: GramRows, kind: str, settings: _Settings) -> Tensor:
    """The pair's class stiffness matrix from ``source``'s rows, reduced across processes."""
    values, norms_r, norms_c = block.of(source)
    metric = settings.metric(ClassStiffness, settings.num_classes, kind)
    metric.update(values, block.labels_r, block.labels_c, norms_r, norms_c, *block.self_pairs)
    return metric.compute().to(values.dtype).cpu()


def _class_measures(
    block: _PairBlock,
    gram: GramRows,
    layer_rows: dict[str, GramRows],
    full: Tensor | None,
    settings: _Settings,
) -> dict[str, dict[str, ClassMeasures]]:
    """Kind -> layer -> class matrix and within/between-class stiffness of one pair: all parameters' (with the
    stiffness matrix, from the whole Gram matrix ``full`` on the CPU, when given), then each layer's own."""
    out: dict[str, dict[str, ClassMeasures]] = {}
    for kind in settings.kinds:
        matrix = _class_matrix(block, gram, kind, settings)
        whole = ClassMeasures(*within_between(matrix), matrix=matrix)
        if full is not None:
            norms = torch.diagonal(full)
            values = full[block.rows, block.cols]
            whole.stiffness = block_stiffness(kind, values, norms[block.rows], norms[block.cols])
        out[kind] = {MODEL: whole}
        for layer, source in layer_rows.items():
            matrix = _class_matrix(block, source, kind, settings)
            out[kind][layer] = ClassMeasures(*within_between(matrix), matrix=matrix)
    return out


def _distance_measures(
    block: _PairBlock,
    gram: GramRows,
    inputs: dict[str, Tensor],
    representations: dict[str, dict[str, Tensor]],
    layers: list[str],
    settings: _Settings,
) -> dict[str, DistanceMeasures]:
    """Space -> distances, stiffness-against-distance curves and critical distance of one pair: input space, then
    each of ``layers``."""
    rows, cols = PAIRS[block.pair]
    dtype = gram.values.dtype
    # Distances are cheap and known to every process: compute them whole, then take this process's rows.
    spaces = {INPUT: pairwise_distances(inputs[rows].detach(), inputs[cols].detach()).to(settings.device)}
    for layer in layers:
        a, b = representations[rows][layer].detach(), representations[cols][layer].detach()
        metric = _distance_metric(settings.distance_metric)
        spaces[layer] = pairwise_distances(a, b, metric=metric).to(settings.device)
    out = {}
    for space, distances in spaces.items():
        curves, xi, sums = _curves(block, gram, distances, xi_kind(settings.kinds), settings)
        out[space] = DistanceMeasures(distances.to(dtype).cpu(), curves, xi, line_fits(sums, curves["within"]))
    return out


def _distance_metric(value: str) -> DistanceMetric:
    """``value`` as one of :data:`~lightning_stiffness.names.DISTANCE_METRICS`.

    Raises:
        ValueError: for another metric (as :func:`pairwise_distances` does).
    """
    for metric in DISTANCE_METRICS:
        if value == metric:
            return metric
    raise ValueError(f"`metric` must be one of {list(DISTANCE_METRICS)}, got {value!r}.")


def _curves(
    block: _PairBlock, gram: GramRows, space: Tensor, kind: str, settings: _Settings
) -> tuple[dict[str, DistanceCurve], float, LineFitSums]:
    """Within- and between-class curves against the distances ``space`` (shared bins), xi and its line's sums
    (within class)."""
    values, norms_r, norms_c = block.of(gram)
    not_self = _not_self(space.shape, block.same_set, settings.device)
    edges = distance_bin_edges(space, not_self, settings.num_distance_bins)
    same_class = block.labels_r[:, None] == block.labels_c[None, :]
    curves, xi, sums = {}, float("nan"), LineFitSums(0.0, 0.0, 0.0, 0.0, 0.0)
    for side, mask in zip(SIDES, (same_class, ~same_class), strict=True):
        metric = settings.metric(StiffnessByDistance, edges, kind)
        metric.update(values, space[block.local], norms_r, norms_c, *block.self_pairs, mask=mask)
        curves[side], side_xi = metric.compute()
        if side == "within":
            with metric.sync_context(should_sync=settings.sync):  # the line of all processes' pairs
                xi, sums = side_xi, LineFitSums(*metric.line_sums.tolist())
    return curves, xi, sums


def _not_self(shape: torch.Size, same_set: bool, device: torch.device) -> Tensor:
    if same_set:
        return ~torch.eye(shape[0], shape[1], dtype=torch.bool, device=device)
    return torch.ones(shape, dtype=torch.bool, device=device)
