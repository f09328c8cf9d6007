"""Version 1 of the raw files, flat: read into the nested structure, and shown that way by the deprecated attributes.

Version 1 (files written before ``format_version`` 2) keyed per-kind values by ``"{pair}/{kind}"``, a layer's
values by ``"{pair}/{layer}"`` or ``"{pair}/{kind}/{layer}"`` (:func:`~lightning_stiffness.names.kind_key`, ...), kept
input space apart from the layers (``critical_distance`` beside ``layer_critical_distance``) and the intervals under
the logged tags, prefix included. :func:`read_v1` builds the nested fields of
:class:`~lightning_stiffness.measures.result.StiffnessResult` from such a dict, taking each key from the structure
(never parsing one), and :func:`flat_view` gives the flat fields back, for the attributes kept one release with a
``DeprecationWarning`` (:data:`DEPRECATED`).
"""

from typing import TYPE_CHECKING, Any

from lightning_stiffness.measures.functional import DistanceCurve
from lightning_stiffness.measures.records import ClassMeasures, DistanceMeasures, GroupMeasures, Interval
from lightning_stiffness.names import (
    INPUT,
    MODEL,
    PAIRS,
    PREFIX,
    SIDES,
    class_tag,
    critical_distance_tag,
    kind_key,
    layer_key,
    layer_kind_key,
)

if TYPE_CHECKING:
    from lightning_stiffness.measures.result import StiffnessResult

#: The flat fields of version 1 that the nested ones replace -> where their values are now (``MODEL``, ``INPUT``:
#: :mod:`lightning_stiffness.names`).
DEPRECATED = {
    "stiffness": "classes[pair][kind][MODEL].stiffness",
    "distances": "spaces[pair][INPUT].distances",
    "class_matrices": "classes[pair][kind][MODEL].matrix",
    "within_class": "classes[pair][kind][MODEL].within",
    "between_class": "classes[pair][kind][MODEL].between",
    "critical_distance": "spaces[pair][INPUT].critical_distance",
    "curves": "spaces[pair][INPUT].curves",
    "layer_within_class": "classes[pair][kind][layer].within",
    "layer_between_class": "classes[pair][kind][layer].between",
    "layer_distances": "spaces[pair][layer].distances",
    "layer_critical_distance": "spaces[pair][layer].critical_distance",
    "layer_curves": "spaces[pair][layer].curves",
    "line_fits": "spaces[pair][space].line_fits",
    "intervals": "classes[pair][kind][MODEL].intervals and spaces[pair][space].interval",
    "curve_intervals": "spaces[pair][space].bands",
    "group_matrices": "groups[pair][kind].matrix",
    "between_class_within_group": "groups[pair][kind].between_class_within_group",
    "between_groups": "groups[pair][kind].between_groups",
}

#: Fields of a version-1 dict that are the same in version 2.
_KEPT = (
    "epoch",
    "step",
    "xi_kind",
    "num_classes",
    "labels",
    "indices",
    "distance_metric",
    "gradient_coherence",
    "gradient_diversity",
    "group_names",
)

#: Version 1's fields of the group measures, in the order of :class:`GroupMeasures`.
_GROUP_FIELDS = ("group_matrices", "between_class_within_group", "between_groups")


def read_v1(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a :class:`~lightning_stiffness.measures.result.StiffnessResult` from the dict of a version-1
    file (fields that files written before them lack are left at their defaults)."""
    kinds = tuple(data["kinds"])
    pairs = [pair for pair in PAIRS if pair in data.get("distances", {})]
    out: dict[str, Any] = {name: data[name] for name in _KEPT if name in data}
    out["kinds"] = kinds
    tagged = _untagged(data.get("intervals", {}), pairs, kinds, data.get("representation_layers", []))
    out["classes"] = {pair: {kind: _class_measures(data, pair, kind, tagged) for kind in kinds} for pair in pairs}
    out["spaces"] = {pair: _spaces(data, pair, tagged) for pair in pairs}
    out["groups"] = _groups(data, pairs, kinds)
    return out


def _groups(data: dict[str, Any], pairs: list[str], kinds: tuple[str, ...]) -> dict[str, dict[str, GroupMeasures]]:
    """Pair -> kind -> :class:`GroupMeasures`, for the pairs and kinds a version-1 file has group measures of."""
    out: dict[str, dict[str, GroupMeasures]] = {}
    for pair in pairs:
        for kind in kinds:
            key = kind_key(pair, kind)
            if key in data.get("between_groups", {}):
                values = (
                    data[name][key] for name in ("group_matrices", "between_class_within_group", "between_groups")
                )
                out.setdefault(pair, {})[kind] = GroupMeasures(*values)
    return out


def _untagged(
    intervals: dict[str, Interval], pairs: list[str], kinds: tuple[str, ...], layers: list[str]
) -> dict[str, Interval]:
    """Version 1's intervals (keyed by tag, with whatever prefix the run had) by their tags without the prefix: each
    tag the structure has, found as the end of a key."""
    wanted = [class_tag(pair, kind, side, prefix="") for pair in pairs for kind in kinds for side in SIDES]
    wanted += [critical_distance_tag(pair, space, prefix="") for pair in pairs for space in (INPUT, *layers)]
    found: dict[str, Interval] = {}
    for suffix in wanted:
        ends = next((v for k, v in intervals.items() if k.endswith(suffix)), None)
        if ends is not None:
            low, high = ends
            found[suffix] = (low, high)
    return found


def _class_measures(data: dict[str, Any], pair: str, kind: str, tagged: dict[str, Interval]) -> dict:
    """Layer -> :class:`ClassMeasures` of one pair and kind: all parameters, then each layer's own."""
    key = kind_key(pair, kind)
    intervals = {side: tagged[tag] for side in SIDES if (tag := class_tag(pair, kind, side, prefix="")) in tagged}
    out = {
        MODEL: ClassMeasures(
            within=data["within_class"][key],
            between=data["between_class"][key],
            matrix=data.get("class_matrices", {}).get(key),
            stiffness=data.get("stiffness", {}).get(key),
            intervals=intervals,
        )
    }
    for layer in data.get("gram_layers", []):
        own = layer_kind_key(pair, kind, layer)
        out[layer] = ClassMeasures(data["layer_within_class"][own], data["layer_between_class"][own])
    return out


def _spaces(data: dict[str, Any], pair: str, tagged: dict[str, Interval]) -> dict[str, DistanceMeasures]:
    """Space -> :class:`DistanceMeasures` of one pair: input space, then each layer's representation."""
    fields = {INPUT: (pair, "distances", "critical_distance", "curves")}
    for layer in data.get("representation_layers", []):
        fields[layer] = (layer_key(pair, layer), "layer_distances", "layer_critical_distance", "layer_curves")
    out = {}
    for space, (key, distances, critical_distance, curves) in fields.items():
        out[space] = DistanceMeasures(
            distances=data[distances][key],
            curves={side: DistanceCurve(**curve) for side, curve in data[curves][key].items()},
            critical_distance=data[critical_distance][key],
            line_fits=data.get("line_fits", {}).get(key, {}),
            interval=tagged.get(critical_distance_tag(pair, space, prefix="")),
            bands={side: tuple(ends) for side, ends in data.get("curve_intervals", {}).get(key, {}).items()},
        )
    return out


def flat_view(result: "StiffnessResult", prefix: str = PREFIX) -> dict[str, Any]:
    """The fields of :data:`DEPRECATED` as version 1 held them (intervals under the tags with ``prefix``)."""
    out: dict[str, dict] = {name: {} for name in DEPRECATED}
    for pair, by_kind in result.classes.items():
        for kind, by_layer in by_kind.items():
            for layer, measures in by_layer.items():
                _flat_classes(out, measures, pair, kind, layer, prefix)
    for pair, by_space in result.spaces.items():
        for space, distance_measures in by_space.items():
            _flat_space(out, distance_measures, pair, space, prefix)
    for pair, groups_by_kind in result.groups.items():
        for kind, groups in groups_by_kind.items():
            key = kind_key(pair, kind)
            out["group_matrices"][key] = groups.matrix
            out["between_class_within_group"][key] = groups.between_class_within_group
            out["between_groups"][key] = groups.between_groups
    return out


def _flat_classes(out: dict[str, dict], measures: ClassMeasures, pair: str, kind: str, layer: str, prefix: str) -> None:
    """One :class:`ClassMeasures` into the flat fields of ``out``."""
    if layer != MODEL:
        own = layer_kind_key(pair, kind, layer)
        out["layer_within_class"][own], out["layer_between_class"][own] = measures.within, measures.between
        return
    key = kind_key(pair, kind)
    if measures.stiffness is not None:
        out["stiffness"][key] = measures.stiffness
    if measures.matrix is not None:
        out["class_matrices"][key] = measures.matrix
    out["within_class"][key], out["between_class"][key] = measures.within, measures.between
    for side, ends in measures.intervals.items():
        out["intervals"][class_tag(pair, kind, side, prefix)] = ends


def _flat_space(out: dict[str, dict], measures: DistanceMeasures, pair: str, space: str, prefix: str) -> None:
    """One :class:`DistanceMeasures` into the flat fields of ``out``."""
    if space == INPUT:
        key, names = pair, ("distances", "critical_distance", "curves")
    else:
        key, names = layer_key(pair, space), ("layer_distances", "layer_critical_distance", "layer_curves")
    values = (measures.distances, measures.critical_distance, measures.curves)
    for name, value in zip(names, values, strict=True):
        out[name][key] = value
    out["line_fits"][key] = measures.line_fits
    if measures.interval is not None:
        out["intervals"][critical_distance_tag(pair, space, prefix)] = measures.interval
    if measures.bands:
        out["curve_intervals"][key] = measures.bands
