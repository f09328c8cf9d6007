"""The result of one probe: :class:`StiffnessResult`, everything it measured, and how it is saved and read back.

The callback computes it (:func:`~lightning_stiffness.measures.probe_measures.measure_stiffness`) and writes it
out; the offline report reads it back from disk with :meth:`StiffnessResult.from_dict`. Plain data: this module
needs neither the metrics nor the Gram engines.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from lightning_stiffness.measures.functional import DistanceCurve
from lightning_stiffness.names import (
    GROUP_SIDES,
    PREFIX,
    SIDES,
    class_tag,
    critical_distance_tag,
    gradient_coherence_tag,
    gradient_diversity_tag,
    group_tag,
    kind_key,
    layer_class_tag,
    layer_key,
    layer_kind_key,
)


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
        line_fits: ``pair`` or ``"{pair}/{layer}"`` -> fit (``"pairs"``: the paper's, whose zero crossing is the
            critical distance; ``"bins"``: through the bin means) -> ``intercept``, ``slope``, ``xi``, ``low``,
            ``high`` (see :mod:`~lightning_stiffness.measures.fitted_lines`).
        gradient_coherence, gradient_diversity: probe set -> float (:mod:`lightning_stiffness.functional`).
        intervals: scalar tag (as logged) -> ``(low, high)``, 95% bootstrap intervals
            (:mod:`lightning_stiffness.measures.intervals`); empty when not measured.
        curve_intervals: ``pair`` or ``"{pair}/{layer}"`` (the keys of ``curves`` and ``layer_curves``) ->
            {``"within"``, ``"between"``} -> ``(low, high)``, float64 [bins] each: the 95% bootstrap band of each
            bin's mean, from the same draws as ``intervals`` (NaN for a bin without pairs); empty when not measured.
        group_names: the class groups (with ``class_groups``), in order.
        group_matrices: ``"{pair}/{kind}"`` -> [G, G] stiffness between groups
            (:mod:`lightning_stiffness.measures.groups`).
        between_class_within_group, between_groups: ``"{pair}/{kind}"`` -> float.
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
    line_fits: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    gradient_coherence: dict[str, float] = field(default_factory=dict)
    gradient_diversity: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    curve_intervals: dict[str, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    group_names: list[str] = field(default_factory=list)
    group_matrices: dict[str, Tensor] = field(default_factory=dict)
    between_class_within_group: dict[str, float] = field(default_factory=dict)
    between_groups: dict[str, float] = field(default_factory=dict)

    @property
    def pairs(self) -> list[str]:
        return list(self.distances)

    def scalars(self, prefix: str = PREFIX) -> dict[str, float]:
        """The logged scalars, by tag (see the README's table); ``prefix`` replaces the tags' first part."""
        out = {}
        for pair in self.pairs:
            for kind in self.kinds:
                values = zip(SIDES, (self.within_class, self.between_class), strict=True)
                out.update({class_tag(pair, kind, side, prefix): v[kind_key(pair, kind)] for side, v in values})
            out[critical_distance_tag(pair, prefix=prefix)] = self.critical_distance[pair]
            for layer in self.representation_layers:
                out[critical_distance_tag(pair, layer, prefix)] = self.layer_critical_distance[layer_key(pair, layer)]
            for kind in self.kinds:
                for layer in self.gram_layers:
                    key = layer_kind_key(pair, kind, layer)
                    out[layer_class_tag(pair, kind, layer, "within", prefix)] = self.layer_within_class[key]
                    out[layer_class_tag(pair, kind, layer, "between", prefix)] = self.layer_between_class[key]
        return {**out, **self._extra_scalars(prefix)}

    def _extra_scalars(self, prefix: str) -> dict[str, float]:
        """Coherence and diversity of each probe set, and the class-group measures."""
        out = {}
        for name in self.gradient_coherence:
            out[gradient_coherence_tag(name, prefix)] = self.gradient_coherence[name]
            out[gradient_diversity_tag(name, prefix)] = self.gradient_diversity[name]
        for key in self.between_groups:
            pair, kind = key.split("/")
            values = (self.between_class_within_group[key], self.between_groups[key])
            out.update({group_tag(pair, kind, side, prefix): v for side, v in zip(GROUP_SIDES, values, strict=True)})
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
        data["curve_intervals"] = {  # absent from files written before the bands
            key: {side: tuple(ends) for side, ends in sides.items()}
            for key, sides in data.get("curve_intervals", {}).items()
        }
        return cls(**data)
