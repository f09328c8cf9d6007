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
    class_stiffness,
    cosine_stiffness,
    critical_distance,
    pairwise_distances,
    sign_stiffness,
    stiffness_by_distance,
    within_between,
)

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


def measure_stiffness(
    gram: Tensor,
    inputs: dict[str, Tensor],
    labels: dict[str, Tensor],
    indices: dict[str, Tensor],
    *,
    kinds: tuple[str, ...] = KINDS,
    num_classes: int,
    num_distance_bins: int = 20,
    epoch: int = 0,
    step: int = 0,
    layer_grams: dict[str, Tensor] | None = None,
    representations: dict[str, dict[str, Tensor]] | None = None,
    distance_metric: str = "cosine",
) -> StiffnessResult:
    """Measure every pair of probe sets from the Gram matrix of all probe examples.

    Args:
        gram: [T, T] Gram matrix of the probe sets' examples, concatenated in the order of ``inputs``.
        inputs: probe set name (``"train"``, optionally ``"val"``) -> its inputs (for input-space distances).
        labels: probe set name -> integer labels.
        indices: probe set name -> dataset indices (recorded, not used).
        kinds: stiffness kinds to measure.
        num_classes: C.
        num_distance_bins: bins of the stiffness-against-distance curves.
        epoch: recorded in the result.
        step: recorded in the result.
        layer_grams: per-layer Gram matrices (summing to ``gram``), for per-layer within/between stiffness, where
            each layer's cosine stiffness uses that layer's own gradient norms.
        representations: probe set name -> layer name -> [n, D] outputs of that layer, for stiffness against
            distance in each layer's representation.
        distance_metric: metric of the representation distances, ``"cosine"`` or ``"euclidean"``.
    """
    offsets, start = {}, 0
    for name, x in inputs.items():
        offsets[name] = slice(start, start + x.shape[0])
        start += x.shape[0]
    if gram.shape != (start, start):
        raise ValueError(f"`gram` must be [{start}, {start}] for these probe sets, got {tuple(gram.shape)}.")
    gram = gram.detach().cpu()
    sq_norms = torch.diagonal(gram)
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
    for pair, (rows, cols) in PAIRS.items():
        if rows not in inputs or cols not in inputs:
            continue
        same_set = rows == cols
        block = gram[offsets[rows], offsets[cols]]
        labels_r, labels_c = result.labels[rows], result.labels[cols]
        labels_c_or_none = None if same_set else labels_c
        measured = {}
        for kind in kinds:
            measured[kind] = _stiffness(kind, block, sq_norms[offsets[rows]], sq_norms[offsets[cols]])
            key = f"{pair}/{kind}"
            result.stiffness[key] = measured[kind]
            matrix = class_stiffness(measured[kind], labels_r, labels_c_or_none, num_classes)
            result.class_matrices[key] = matrix
            result.within_class[key], result.between_class[key] = within_between(matrix)
        for layer, layer_gram in (layer_grams or {}).items():
            layer_gram = layer_gram.detach().cpu()
            layer_norms = torch.diagonal(layer_gram)
            layer_block = layer_gram[offsets[rows], offsets[cols]]
            for kind in kinds:
                layer_stiffness = _stiffness(kind, layer_block, layer_norms[offsets[rows]], layer_norms[offsets[cols]])
                matrix = class_stiffness(layer_stiffness, labels_r, labels_c_or_none, num_classes)
                key = f"{pair}/{kind}/{layer}"
                result.layer_within_class[key], result.layer_between_class[key] = within_between(matrix)
        distances = pairwise_distances(inputs[rows].detach().cpu(), inputs[cols].detach().cpu()).to(block.dtype)
        result.distances[pair] = distances
        not_self = ~torch.eye(*block.shape, dtype=torch.bool) if same_set else torch.ones_like(block, dtype=torch.bool)
        same_class = (labels_r[:, None] == labels_c[None, :]) & not_self
        different_class = (labels_r[:, None] != labels_c[None, :]) & not_self
        stiffness = measured[xi_kind]
        masks = (same_class, different_class, not_self)
        result.critical_distance[pair], result.curves[pair] = _against_distance(
            stiffness, distances, masks, num_distance_bins
        )
        for layer in result.representation_layers:
            key = f"{pair}/{layer}"
            layer_distances = pairwise_distances(
                representations[rows][layer].detach().cpu(),
                representations[cols][layer].detach().cpu(),
                metric=distance_metric,
            ).to(block.dtype)
            result.layer_distances[key] = layer_distances
            result.layer_critical_distance[key], result.layer_curves[key] = _against_distance(
                stiffness, layer_distances, masks, num_distance_bins
            )
    return result


def _against_distance(
    stiffness: Tensor, distances: Tensor, masks: tuple[Tensor, Tensor, Tensor], bins: int
) -> tuple[float, dict[str, DistanceCurve]]:
    """xi over same-class pairs, and the within/between curves on shared bin edges."""
    same_class, different_class, not_self = masks
    edges = stiffness_by_distance(stiffness, distances, not_self, bins=bins).edges
    curves = {
        "within": stiffness_by_distance(stiffness, distances, same_class, bins=edges),
        "between": stiffness_by_distance(stiffness, distances, different_class, bins=edges),
    }
    return critical_distance(stiffness, distances, same_class), curves


def _stiffness(kind: str, block: Tensor, sq_norms_rows: Tensor, sq_norms_cols: Tensor) -> Tensor:
    if kind == "cosine":
        return cosine_stiffness(block, sq_norms_rows, sq_norms_cols)
    return sign_stiffness(block)
