"""One probe's measures, from the Gram matrix of its examples to the numbers and curves that get logged.

Pure PyTorch: the callback computes a :class:`StiffnessResult` with :func:`measure_stiffness` and writes it out; the
offline report reads the same object back from disk with :meth:`StiffnessResult.from_dict`.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_stiffness.functional import (
    DistanceCurve,
    distance_bin_edges,
    pairwise_distances,
    within_between,
)
from lightning_stiffness.metrics import ClassStiffness, StiffnessByDistance, block_stiffness

#: Stiffness kinds, in the order they are computed and logged.
KINDS = ("cosine", "sign")
#: Which probe sets each pair compares: (rows, columns).
PAIRS = {"train-train": ("train", "train"), "train-val": ("train", "val"), "val-val": ("val", "val")}


@dataclass
class StiffnessResult:
    """Everything one probe measured. Matrices are on the CPU; ``"{pair}/{kind}"`` keys index per-kind values.

    Attributes:
        epoch: the epoch the probe ran at (0 for the probe at initialisation).
        step: the trainer's global step (0 for the probe at initialisation).
        kinds: the stiffness kinds measured (``"cosine"``, ``"sign"``).
        xi_kind: the kind the critical distances are fitted on (cosine when measured, else sign).
        num_classes: C, the size of the class matrices.
        labels, indices: per probe set (``"train"``, ``"val"``), the examples' labels and dataset indices.
        stiffness: ``"{pair}/{kind}"`` -> [N, M] stiffness between the pair's examples.
        distances: ``pair`` -> [N, M] input-space cosine distances.
        class_matrices: ``"{pair}/{kind}"`` -> [C, C] class stiffness matrix.
        within_class, between_class: ``"{pair}/{kind}"`` -> float.
        critical_distance: ``pair`` -> xi over same-class pairs, input-space cosine distance.
        curves: ``pair`` -> {``"within"``, ``"between"``} -> :class:`DistanceCurve` (shared bin edges).
        gram_layers: the layers whose own gradients were measured (per-layer Gram matrices), in network order.
        layer_within_class, layer_between_class: ``"{pair}/{kind}/{layer}"`` -> float, from each layer's own Gram.
        representation_layers: the layers whose outputs distances were measured in, in network order.
        distance_metric: the metric of those distances (``cosine``: 1 - cos, or ``euclidean``).
        layer_distances: ``"{pair}/{layer}"`` -> [N, M] distances between the examples' outputs of that layer.
        layer_critical_distance: ``"{pair}/{layer}"`` -> xi in that layer's representation (same-class pairs).
        layer_curves: ``"{pair}/{layer}"`` -> {``"within"``, ``"between"``} -> :class:`DistanceCurve`.
    """

    epoch: int
    step: int
    kinds: tuple[str, ...]
    xi_kind: str
    num_classes: int
    labels: dict[str, Tensor]
    indices: dict[str, Tensor]
    stiffness: dict[str, Tensor] = field(default_factory=dict)
    distances: dict[str, Tensor] = field(default_factory=dict)
    class_matrices: dict[str, Tensor] = field(default_factory=dict)
    within_class: dict[str, float] = field(default_factory=dict)
    between_class: dict[str, float] = field(default_factory=dict)
    critical_distance: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict[str, DistanceCurve]] = field(default_factory=dict)
    gram_layers: list[str] = field(default_factory=list)
    layer_within_class: dict[str, float] = field(default_factory=dict)
    layer_between_class: dict[str, float] = field(default_factory=dict)
    representation_layers: list[str] = field(default_factory=list)
    distance_metric: str = "cosine"
    layer_distances: dict[str, Tensor] = field(default_factory=dict)
    layer_critical_distance: dict[str, float] = field(default_factory=dict)
    layer_curves: dict[str, dict[str, DistanceCurve]] = field(default_factory=dict)

    @property
    def pairs(self) -> list[str]:
        return list(self.distances)

    def scalars(self) -> dict[str, float]:
        """The logged scalars, by tag (see the README's table)."""
        out = {}
        for pair in self.pairs:
            for kind in self.kinds:
                out[f"stiffness/{pair}/{kind}/within_class"] = self.within_class[f"{pair}/{kind}"]
                out[f"stiffness/{pair}/{kind}/between_class"] = self.between_class[f"{pair}/{kind}"]
            out[f"stiffness/{pair}/critical_distance/input"] = self.critical_distance[pair]
            for layer in self.representation_layers:
                out[f"stiffness/{pair}/critical_distance/{layer}"] = self.layer_critical_distance[f"{pair}/{layer}"]
            for kind in self.kinds:
                for layer in self.gram_layers:
                    key = f"{pair}/{kind}/{layer}"
                    out[f"stiffness/{pair}/{kind}/by_layer/{layer}/within_class"] = self.layer_within_class[key]
                    out[f"stiffness/{pair}/{kind}/by_layer/{layer}/between_class"] = self.layer_between_class[key]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, floats and tensors, for ``torch.save`` (loads with ``weights_only=True``)."""
        data = asdict(self)
        data["kinds"] = list(self.kinds)
        for name in ("curves", "layer_curves"):
            data[name] = {
                key: {side: curve._asdict() for side, curve in sides.items()}
                for key, sides in getattr(self, name).items()
            }
        data["format_version"] = 1
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StiffnessResult":
        """Inverse of :meth:`to_dict`."""
        data = {k: v for k, v in data.items() if k != "format_version"}
        data["kinds"] = tuple(data["kinds"])
        for name in ("curves", "layer_curves"):
            data[name] = {
                key: {side: DistanceCurve(**curve) for side, curve in sides.items()}
                for key, sides in data.get(name, {}).items()
            }
        return cls(**data)


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
    """
    offsets, start = {}, 0
    for name, x in inputs.items():
        offsets[name] = slice(start, start + x.shape[0])
        start += x.shape[0]
    rows_of = gram if isinstance(gram, GramRows) else GramRows.whole(gram)
    if rows_of.values.dim() != 2 or rows_of.values.shape[1] != start or rows_of.sq_norms.shape != (start,):
        raise ValueError(f"`gram` must have {start} columns and {start} norms, got {tuple(rows_of.values.shape)}.")
    if full_gram is None and not isinstance(gram, GramRows):
        full_gram = gram
    device = rows_of.values.device
    xi_kind = "cosine" if "cosine" in kinds else kinds[0]
    result = StiffnessResult(
        epoch=epoch,
        step=step,
        kinds=tuple(kinds),
        xi_kind=xi_kind,
        num_classes=num_classes,
        labels={k: v.cpu() for k, v in labels.items()},
        indices={k: v.cpu() for k, v in indices.items()},
        gram_layers=list(layer_grams or {}),
        representation_layers=list(next(iter(representations.values()), {})) if representations else [],
        distance_metric=distance_metric,
    )
    layer_rows = {
        layer: g if isinstance(g, GramRows) else GramRows.whole(g) for layer, g in (layer_grams or {}).items()
    }
    all_labels = torch.cat([labels[name].to(device) for name in inputs])
    full_norms = torch.diagonal(full_gram.detach()).cpu() if full_gram is not None else None

    def metric(metric_class, *args):
        return metric_class(*args, sync_on_compute=sync).to(device)

    for pair, (rows, cols) in PAIRS.items():
        if rows not in inputs or cols not in inputs:
            continue
        same_set = rows == cols
        rs, cs = offsets[rows], offsets[cols]
        mine = (rows_of.rows >= rs.start) & (rows_of.rows < rs.stop)
        ids = rows_of.rows[mine]
        col_ids = torch.arange(cs.start, cs.stop, device=device)
        pair_ids = (ids, col_ids) if same_set else (None, None)
        labels_r, labels_c = all_labels[ids], all_labels[cs]

        block, norms_r, norms_c = _block_of(rows_of, mine, ids, cs)
        if full_gram is not None:
            full_block = full_gram.detach()[rs, cs].cpu()
        for kind in kinds:
            key = f"{pair}/{kind}"
            classes = metric(ClassStiffness, num_classes, kind)
            classes.update(block, labels_r, labels_c, norms_r, norms_c, *pair_ids)
            result.class_matrices[key] = classes.compute().to(block.dtype).cpu()
            result.within_class[key], result.between_class[key] = within_between(result.class_matrices[key])
            if full_gram is not None:
                result.stiffness[key] = block_stiffness(kind, full_block, full_norms[rs], full_norms[cs])
            for layer, source in layer_rows.items():
                classes = metric(ClassStiffness, num_classes, kind)
                layer_block, layer_norms_r, layer_norms_c = _block_of(source, mine, ids, cs)
                classes.update(layer_block, labels_r, labels_c, layer_norms_r, layer_norms_c, *pair_ids)
                matrix = classes.compute()
                key = f"{pair}/{kind}/{layer}"
                result.layer_within_class[key], result.layer_between_class[key] = within_between(matrix)

        # Distances are cheap and known to every process: compute them whole, then take this process's rows.
        local = ids - rs.start
        same_class = labels_r[:, None] == labels_c[None, :]
        distances = pairwise_distances(inputs[rows].detach(), inputs[cols].detach()).to(device)
        result.distances[pair] = distances.to(block.dtype).cpu()
        spaces = {None: distances}
        for layer in result.representation_layers:
            spaces[layer] = pairwise_distances(
                representations[rows][layer].detach(), representations[cols][layer].detach(), metric=distance_metric
            ).to(device)
            result.layer_distances[f"{pair}/{layer}"] = spaces[layer].to(block.dtype).cpu()
        for layer, space in spaces.items():
            not_self = _not_self(space.shape, same_set, device)
            edges = distance_bin_edges(space, not_self, num_distance_bins)
            curves, xi = {}, float("nan")
            for side, side_mask in (("within", same_class), ("between", ~same_class)):
                by_distance = metric(StiffnessByDistance, edges, xi_kind)
                by_distance.update(block, space[local], norms_r, norms_c, *pair_ids, mask=side_mask)
                curves[side], side_xi = by_distance.compute()
                xi = side_xi if side == "within" else xi
            if layer is None:
                result.critical_distance[pair], result.curves[pair] = xi, curves
            else:
                result.layer_critical_distance[f"{pair}/{layer}"], result.layer_curves[f"{pair}/{layer}"] = xi, curves
    return result


def _block_of(source: GramRows, mine: Tensor, ids: Tensor, cols: slice) -> tuple[Tensor, Tensor, Tensor]:
    """This process's rows of a pair's block, with the squared norms of its rows and columns."""
    return source.values[mine][:, cols], source.sq_norms[ids], source.sq_norms[cols]


def _not_self(shape: torch.Size, same_set: bool, device: torch.device) -> Tensor:
    if same_set:
        return ~torch.eye(shape[0], shape[1], dtype=torch.bool, device=device)
    return torch.ones(shape, dtype=torch.bool, device=device)
