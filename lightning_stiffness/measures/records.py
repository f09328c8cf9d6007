"""The parts of a probe's result, each measured for one pair of probe sets: class stiffness of one kind from one Gram
matrix (:class:`ClassMeasures`), stiffness against distance in one space (:class:`DistanceMeasures`), stiffness
between class groups (:class:`GroupMeasures`).

Plain data. ``to_dict`` gives plain dicts, lists, floats and tensors (``torch.load(..., weights_only=True)`` reads
them back), ``from_dict`` is its inverse; :class:`~lightning_stiffness.measures.result.StiffnessResult` nests them by
structure: pair -> kind -> layer, pair -> space, pair -> kind.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from lightning_stiffness.measures.fitted_lines import extrapolated
from lightning_stiffness.measures.functional import DistanceCurve
from lightning_stiffness.names import FITS

#: An interval's ends ``(low, high)``.
Interval = tuple[float, float]


def _fields(record: Any) -> dict[str, Any]:
    """A record's fields by name, the values as they are (no copies)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


@dataclass
class ClassMeasures:
    """One pair's class stiffness of one kind, from one Gram matrix: all parameters' or one layer's own.

    Attributes:
        within, between: the mean of the class matrix's diagonal / off-diagonal entries (NaN-ignoring).
        matrix: [C, C] class stiffness matrix (rows: classes of the pair's first probe set); None where a version-1
            file did not keep it (a layer's own).
        stiffness: [N, M] stiffness between the pair's examples, from all parameters when the probe kept its
            matrices; None otherwise (and for a layer's own).
        intervals: side (``"within"``, ``"between"``) -> ``(low, high)``, the 95% bootstrap interval
            (:mod:`~lightning_stiffness.measures.intervals`); empty when not measured.
    """

    within: float
    between: float
    matrix: Tensor | None = None
    stiffness: Tensor | None = None
    intervals: dict[str, Interval] = field(default_factory=dict)

    def value(self, side: str) -> float:
        """``within`` (``side="within"``) or ``between``."""
        return self.within if side == "within" else self.between

    def to_dict(self) -> dict[str, Any]:
        return {**_fields(self), "intervals": dict(self.intervals)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassMeasures":
        intervals = {side: tuple(ends) for side, ends in data.get("intervals", {}).items()}
        return cls(**{**data, "intervals": intervals})


@dataclass
class DistanceMeasures:
    """One pair's stiffness against distance in one space: the inputs' (``"input"``) or a layer's outputs.

    Attributes:
        distances: [N, M] distances between the pair's examples: 1 - cos of the inputs, or the result's
            ``distance_metric`` between a layer's flattened outputs.
        curves: side (``"within"``, ``"between"``) -> :class:`DistanceCurve` (bin edges shared by both sides).
        critical_distance: xi, where the least-squares line through same-class (distance, stiffness) pairs of the
            result's ``xi_kind`` crosses zero.
        line_fits: fit (``"pairs"``: the paper's, whose crossing is ``critical_distance``; ``"bins"``: through the bin
            means) -> ``intercept``, ``slope``, ``xi``, ``low``, ``high``
            (:mod:`~lightning_stiffness.measures.fitted_lines`).
        interval: xi's 95% bootstrap interval ``(low, high)``; None when not measured.
        extrapolated: (a property, also in the raw dict) whether ``critical_distance`` lies outside the observed
            range ``line_fits["pairs"]["low"]..["high"]`` (True), inside it (False), or there is no xi (None).
        bands: side -> ``(low, high)``, float64 [bins] each, the 95% bootstrap band of each bin's mean (NaN for a bin
            without pairs); empty when not measured.
    """

    distances: Tensor
    curves: dict[str, DistanceCurve]
    critical_distance: float
    line_fits: dict[str, dict[str, float]] = field(default_factory=dict)
    interval: Interval | None = None
    bands: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def extrapolated(self) -> bool | None:
        """Whether xi is extrapolated (:func:`~lightning_stiffness.measures.fitted_lines.extrapolated`) beyond the
        same-class distances it was fitted on; None without xi or without the fit's observed range."""
        fit = self.line_fits.get(FITS[0], {})
        return extrapolated(self.critical_distance, fit.get("low", math.nan), fit.get("high", math.nan))

    def to_dict(self) -> dict[str, Any]:
        curves = {side: curve._asdict() for side, curve in self.curves.items()}
        data = {**_fields(self), "curves": curves, "line_fits": dict(self.line_fits), "bands": dict(self.bands)}
        return {**data, "extrapolated": self.extrapolated}  # derived: for readers of the raw file

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistanceMeasures":
        data = {key: value for key, value in data.items() if key != "extrapolated"}
        curves = {side: DistanceCurve(**curve) for side, curve in data["curves"].items()}
        interval = tuple(data["interval"]) if data.get("interval") is not None else None
        bands = {side: tuple(ends) for side, ends in data.get("bands", {}).items()}
        return cls(**{**data, "curves": curves, "interval": interval, "bands": bands})


@dataclass
class GroupMeasures:
    """One pair's stiffness of one kind between class groups (:mod:`~lightning_stiffness.measures.groups`).

    Attributes:
        matrix: [G, G] mean stiffness over pairs of examples of two groups (self-pairs left out).
        between_class_within_group: the mean class-matrix entry between different classes of one group.
        between_groups: the mean class-matrix entry between classes of different groups.
    """

    matrix: Tensor
    between_class_within_group: float
    between_groups: float

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GroupMeasures":
        return cls(**data)
