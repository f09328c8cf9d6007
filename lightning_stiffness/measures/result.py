"""The result of one probe: :class:`StiffnessResult`, everything it measured, and how it is saved and read back.

The callback computes it (:func:`~lightning_stiffness.measures.probe_measures.measure_stiffness`) and writes it
out; the offline report reads it back from disk with :meth:`StiffnessResult.from_dict`. Plain data: this module
needs neither the metrics nor the Gram engines.

A result is nested by structure, as its tags are built (:mod:`lightning_stiffness.names`): class stiffness by pair,
kind and layer (:data:`~lightning_stiffness.names.MODEL`, all parameters, then each layer's own Gram matrix),
stiffness against distance by pair and space (:data:`~lightning_stiffness.names.INPUT`, then each layer whose
outputs were recorded), group stiffness by pair and kind. Files of version 1 (flat ``"{pair}/{kind}"`` keys) load
into the same structure (:mod:`~lightning_stiffness.measures.result_v1`), and the flat attributes of version 1
(``result.within_class``, ...) still read, with a ``DeprecationWarning``, for one release.

Example::

    >>> from lightning_stiffness.names import INPUT, MODEL
    >>> result.classes["train-val"]["cosine"][MODEL].within  # doctest: +SKIP
    0.41
    >>> result.spaces["train-train"][INPUT].critical_distance  # doctest: +SKIP
    0.63
"""

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from lightning_stiffness.measures.records import ClassMeasures, DistanceMeasures, GroupMeasures
from lightning_stiffness.measures.result_v1 import DEPRECATED, flat_view, read_v1
from lightning_stiffness.names import (
    GROUP_SIDES,
    INPUT,
    INTERVAL_ENDS,
    MODEL,
    PREFIX,
    RAW_FORMAT_VERSION,
    SIDES,
    class_tag,
    critical_distance_tag,
    extrapolated_tag,
    gradient_coherence_tag,
    gradient_diversity_tag,
    group_tag,
    interval_tag,
)

#: How each nested field of a result is saved and read back: its record type, and how many dicts down the records lie.
_NESTED: dict[str, tuple[type[ClassMeasures | DistanceMeasures | GroupMeasures], int]] = {
    "classes": (ClassMeasures, 3),
    "spaces": (DistanceMeasures, 2),
    "groups": (GroupMeasures, 2),
}


@dataclass
class StiffnessResult:
    """Everything one probe measured. Tensors are on the CPU; pairs are ``"train-train"``, ``"train-val"``,
    ``"val-val"`` (those whose probe sets exist), in that order.

    Attributes:
        epoch: the epoch the probe ran at (0 for the probe at initialisation).
        step: the trainer's global step (0 for the probe at initialisation).
        kinds: the stiffness kinds measured (``"cosine"``, ``"sign"``).
        xi_kind: the kind the critical distances are fitted on (cosine when measured, else sign).
        num_classes: C, the size of the class matrices.
        labels, indices: per probe set (``"train"``, ``"val"``), the examples' labels and dataset indices.
        classes: pair -> kind -> layer -> :class:`~lightning_stiffness.measures.records.ClassMeasures`: the class
            matrix, within/between-class stiffness and their intervals; layer :data:`~lightning_stiffness.names.MODEL`
            (``""``, all parameters) first, with the [N, M] stiffness matrix, then, with ``per_layer``, each layer's
            own gradients in network order.
        spaces: pair -> space -> :class:`~lightning_stiffness.measures.records.DistanceMeasures`: distances, the
            stiffness-against-distance curves, xi with its fitted lines, interval and bands; space
            :data:`~lightning_stiffness.names.INPUT` (``"input"``, cosine distance of the inputs) first, then each
            layer whose outputs were recorded (``layers``), in network order.
        distance_metric: the metric of the layers' distances (``cosine``: 1 - cos, or ``euclidean``).
        gradient_coherence, gradient_diversity: probe set -> float (:mod:`lightning_stiffness.functional`).
        group_names: the class groups (with ``class_groups``), in order.
        groups: pair -> kind -> :class:`~lightning_stiffness.measures.records.GroupMeasures` (with
            ``class_groups``; :mod:`lightning_stiffness.measures.groups`).
    """

    epoch: int
    step: int
    kinds: tuple[str, ...]
    xi_kind: str
    num_classes: int
    labels: dict[str, Tensor]
    indices: dict[str, Tensor]
    classes: dict[str, dict[str, dict[str, ClassMeasures]]] = field(default_factory=dict)
    spaces: dict[str, dict[str, DistanceMeasures]] = field(default_factory=dict)
    distance_metric: str = "cosine"
    gradient_coherence: dict[str, float] = field(default_factory=dict)
    gradient_diversity: dict[str, float] = field(default_factory=dict)
    group_names: list[str] = field(default_factory=list)
    groups: dict[str, dict[str, GroupMeasures]] = field(default_factory=dict)

    @property
    def pairs(self) -> list[str]:
        """The pairs of probe sets measured."""
        return list(self.classes)

    @property
    def gram_layers(self) -> list[str]:
        """The layers whose own gradients were measured (``per_layer``), in network order."""
        by_layer = next((by_layer for by_kind in self.classes.values() for by_layer in by_kind.values()), {})
        return [layer for layer in by_layer if layer != MODEL]

    @property
    def representation_layers(self) -> list[str]:
        """The layers whose outputs distances were measured in (``layers``), in network order."""
        return [space for space in next(iter(self.spaces.values()), {}) if space != INPUT]

    @property
    def has_stiffness(self) -> bool:
        """Whether the result holds the [N, M] stiffness matrices (intervals and groups are computed from them)."""
        return any(m[MODEL].stiffness is not None for by_kind in self.classes.values() for m in by_kind.values())

    def scalars(self, prefix: str = PREFIX) -> dict[str, float]:
        """The logged scalars, by tag (see the README's table); ``prefix`` replaces the tags' first part."""
        out = {}
        for pair in self.pairs:
            for kind in self.kinds:
                whole = self.classes[pair][kind][MODEL]
                out.update({class_tag(pair, kind, side, prefix): whole.value(side) for side in SIDES})
            for space, measures in self.spaces[pair].items():
                out[critical_distance_tag(pair, space, prefix)] = measures.critical_distance
                flag = measures.extrapolated  # beside xi, so that xi stays one number a monitor can read
                out[extrapolated_tag(pair, space, prefix)] = math.nan if flag is None else float(flag)
            for kind in self.kinds:
                for layer, own in self.classes[pair][kind].items():
                    if layer != MODEL:
                        out.update({class_tag(pair, kind, side, prefix, layer): own.value(side) for side in SIDES})
        return {**out, **self._extra_scalars(prefix)}

    def interval_scalars(self, prefix: str = PREFIX) -> dict[str, float]:
        """The ends of the 95% bootstrap intervals of the within/between-class scalars and of xi, by tag
        (:func:`~lightning_stiffness.names.interval_tag`); empty without intervals (``num_bootstrap=0``)."""
        found: dict[str, tuple[float, float] | None] = {}
        for pair in self.pairs:
            for kind in self.kinds:
                whole = self.classes[pair][kind][MODEL]
                found.update({class_tag(pair, kind, side, prefix): whole.intervals.get(side) for side in SIDES})
            for space, measures in self.spaces[pair].items():
                found[critical_distance_tag(pair, space, prefix)] = measures.interval
        return {
            interval_tag(tag, end, prefix): float(value)
            for tag, ends in found.items()
            if ends is not None
            for end, value in zip(INTERVAL_ENDS, ends, strict=True)
        }

    def _extra_scalars(self, prefix: str) -> dict[str, float]:
        """Coherence and diversity of each probe set, and the class-group measures."""
        out = {}
        for name in self.gradient_coherence:
            out[gradient_coherence_tag(name, prefix)] = self.gradient_coherence[name]
            out[gradient_diversity_tag(name, prefix)] = self.gradient_diversity[name]
        for pair, by_kind in self.groups.items():
            for kind, measures in by_kind.items():
                out.update({group_tag(pair, kind, side, prefix): getattr(measures, side) for side in GROUP_SIDES})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, floats and tensors, for ``torch.save`` (loads with ``weights_only=True``): the fields
        by name, nested as they are, and ``format_version`` (:data:`~lightning_stiffness.names.RAW_FORMAT_VERSION`)."""
        data: dict[str, Any] = {"format_version": RAW_FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NESTED:
                value = _nested(value, _NESTED[f.name][1], lambda record: record.to_dict())
            data[f.name] = list(value) if f.name == "kinds" else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StiffnessResult":
        """Inverse of :meth:`to_dict`; also reads the dicts of version-1 files (flat keys).

        Raises:
            ValueError: for a ``format_version`` this version of the package does not know (a newer file).
        """
        version = data.get("format_version", 1)
        if version == 1:
            return cls(**read_v1(data))
        if version != RAW_FORMAT_VERSION:
            raise ValueError(
                f"raw results of format_version {version!r} are newer than this lightning-stiffness reads "
                f"(versions 1 and {RAW_FORMAT_VERSION}); upgrade the package to read them."
            )
        kwargs = {k: v for k, v in data.items() if k != "format_version"}
        kwargs["kinds"] = tuple(kwargs["kinds"])
        for name, (record, depth) in _NESTED.items():
            kwargs[name] = _nested(kwargs.get(name, {}), depth, record.from_dict)
        return cls(**kwargs)


def _nested(tree: dict[str, Any], depth: int, leaf: Any) -> dict[str, Any]:
    """``tree`` with ``leaf`` applied to the values ``depth`` dicts down."""
    if depth == 0:
        return leaf(tree)
    return {key: _nested(value, depth - 1, leaf) for key, value in tree.items()}


def _deprecated(name: str, replacement: str) -> property:
    def read(self: StiffnessResult) -> Any:
        warnings.warn(
            f"StiffnessResult.{name} is deprecated and will be removed in the next release; read "
            f"result.{replacement} (MODEL and INPUT from lightning_stiffness.names). It is a copy in the flat "
            "layout of version 1: changing it changes nothing.",
            DeprecationWarning,
            stacklevel=2,
        )
        return flat_view(self)[name]

    return property(read, doc=f"Deprecated (version 1's flat layout, read-only): use ``{replacement}``.")


for _name, _replacement in DEPRECATED.items():
    setattr(StiffnessResult, _name, _deprecated(_name, _replacement))
