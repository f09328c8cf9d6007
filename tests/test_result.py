"""StiffnessResult as structure: classes by pair, kind and layer (MODEL first), distance measures by pair and space
(INPUT first), groups by pair and kind; raw files of version 2 round-trip, version-1 files (written by the code
before, ``tests/data``) load into the structure with the same numbers, and the flat attributes of version 1 still
read, with a DeprecationWarning, for one release."""

import io
import json
import math
import shutil
import warnings

import pytest
import torch

from lightning_stiffness.functional import within_between
from lightning_stiffness.measures.functional import DistanceCurve
from lightning_stiffness.measures.probe_measures import measure_stiffness
from lightning_stiffness.measures.records import ClassMeasures, DistanceMeasures, GroupMeasures
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.measures.result_v1 import DEPRECATED, flat_view
from lightning_stiffness.names import (
    INPUT,
    MODEL,
    RAW_FORMAT_VERSION,
    SIDES,
    class_tag,
    critical_distance_tag,
    distance_curve_tag,
    kind_key,
    layer_class_tag,
    layer_key,
    layer_kind_key,
)
from lightning_stiffness.report import write_report
from tests.helpers import FIXTURE_V1, FIXTURE_V1_SCALARS


def _v1() -> dict:
    return torch.load(FIXTURE_V1, weights_only=True)


def _same(a, b) -> bool:
    """Equal values, tensors bit for bit (NaN where NaN), curves field by field, in any dict order."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and (
            torch.equal(a.nan_to_num(), b.nan_to_num())
        )  # fmt: skip
    if isinstance(a, DistanceCurve):
        return _same(a._asdict(), b._asdict())
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_a_version_1_file_loads_into_the_structure_with_the_same_numbers():
    data = _v1()
    assert data["format_version"] == 1
    result = StiffnessResult.from_dict(data)
    pairs, kinds = ["train-train", "train-val", "val-val"], ("cosine", "sign")
    assert result.pairs == pairs and result.kinds == kinds
    assert result.gram_layers == data["gram_layers"] == ["net.0", "net.3"]
    assert result.representation_layers == data["representation_layers"] == ["net.1"]
    for pair in pairs:
        assert list(result.classes[pair]) == list(kinds)
        for kind in kinds:
            key = kind_key(pair, kind)
            by_layer = result.classes[pair][kind]
            assert list(by_layer) == [MODEL, "net.0", "net.3"]
            whole = by_layer[MODEL]
            assert whole.within == data["within_class"][key] and whole.between == data["between_class"][key]
            assert torch.equal(whole.stiffness, data["stiffness"][key])
            assert _same(whole.matrix, data["class_matrices"][key])
            for side in SIDES:
                assert whole.intervals[side] == tuple(data["intervals"][class_tag(pair, kind, side)])
            for layer in ("net.0", "net.3"):
                own = by_layer[layer]
                assert own.within == data["layer_within_class"][layer_kind_key(pair, kind, layer)]
                assert own.between == data["layer_between_class"][layer_kind_key(pair, kind, layer)]
                assert own.matrix is None and own.stiffness is None and own.intervals == {}
            groups = result.groups[pair][kind]
            assert torch.equal(groups.matrix, data["group_matrices"][key])
            assert groups.between_groups == data["between_groups"][key]
            assert groups.between_class_within_group == data["between_class_within_group"][key]
        assert list(result.spaces[pair]) == [INPUT, "net.1"]
        for space, key, prefix in ((INPUT, pair, ""), ("net.1", layer_key(pair, "net.1"), "layer_")):
            measures = result.spaces[pair][space]
            assert torch.equal(measures.distances, data[f"{prefix}distances"][key])
            assert measures.critical_distance == data[f"{prefix}critical_distance"][key]
            assert _same(measures.curves, {s: DistanceCurve(**c) for s, c in data[f"{prefix}curves"][key].items()})
            assert measures.line_fits == data["line_fits"][key]
            assert measures.interval == tuple(data["intervals"][critical_distance_tag(pair, space)])
            assert _same(measures.bands, {s: tuple(ends) for s, ends in data["curve_intervals"][key].items()})
    assert result.group_names == data["group_names"]
    assert result.gradient_coherence == data["gradient_coherence"]


def test_a_version_1_file_logs_the_scalars_it_logged_then():
    result = StiffnessResult.from_dict(_v1())
    expected = json.loads(FIXTURE_V1_SCALARS.read_text())
    # The same tags, in the same order, bit for bit; and beside each xi the flag added since (critical_distance_
    # extrapolated), which version 1 did not log.
    scalars = {tag: v for tag, v in result.scalars().items() if "/critical_distance_extrapolated/" not in tag}
    assert list(scalars) == list(expected)
    assert _same(list(scalars.values()), list(expected.values()))
    flags = [tag for tag in result.scalars() if "/critical_distance_extrapolated/" in tag]
    assert flags == [
        tag.replace("/critical_distance/", "/critical_distance_extrapolated/")
        for tag in expected
        if "/critical_distance/" in tag
    ]
    custom = [tag for tag in result.scalars("custom") if "/critical_distance_extrapolated/" not in tag]
    assert custom == [tag.replace("stiffness/", "custom/", 1) for tag in expected]


def test_version_1_intervals_under_another_prefix_are_found_by_their_tags():
    data = _v1()
    data["intervals"] = {tag.replace("stiffness/", "runs/a/", 1): ends for tag, ends in data["intervals"].items()}
    result = StiffnessResult.from_dict(data)
    whole = result.classes["train-val"]["sign"][MODEL]
    assert whole.intervals["between"] == tuple(_v1()["intervals"][class_tag("train-val", "sign", "between")])
    assert result.spaces["val-val"]["net.1"].interval == tuple(
        _v1()["intervals"][critical_distance_tag("val-val", "net.1")]
    )
    del data["intervals"], data["curve_intervals"], data["line_fits"]  # files written before them
    older = StiffnessResult.from_dict(data)
    assert older.classes["train-train"]["cosine"][MODEL].intervals == {}
    assert older.spaces["train-train"][INPUT].interval is None and older.spaces["train-train"][INPUT].bands == {}


def test_version_2_round_trips_through_a_weights_only_file():
    result = StiffnessResult.from_dict(_v1())
    data = result.to_dict()
    assert data["format_version"] == RAW_FORMAT_VERSION == 2
    assert list(data["classes"]["train-val"]["cosine"]) == [MODEL, "net.0", "net.3"]
    assert list(data["spaces"]["val-val"]) == [INPUT, "net.1"]
    assert set(data["classes"]["train-val"]["cosine"][MODEL]) == {
        "within",
        "between",
        "matrix",
        "stiffness",
        "intervals",
    }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    loaded = StiffnessResult.from_dict(torch.load(buffer, weights_only=True))
    assert _same(loaded.to_dict(), data)
    assert isinstance(loaded.classes["train-train"]["sign"]["net.3"], ClassMeasures)
    assert isinstance(loaded.spaces["train-train"]["net.1"], DistanceMeasures)
    assert isinstance(loaded.spaces["train-train"]["net.1"].curves["within"], DistanceCurve)
    assert isinstance(loaded.groups["val-val"]["cosine"], GroupMeasures)
    assert isinstance(loaded.spaces["train-train"][INPUT].interval, tuple)
    assert _same(loaded.scalars(), result.scalars())


def test_an_unknown_format_version_is_refused_with_what_to_do():
    data = StiffnessResult.from_dict(_v1()).to_dict()
    data["format_version"] = 3
    with pytest.raises(ValueError, match=r"format_version 3.*upgrade"):
        StiffnessResult.from_dict(data)


@pytest.mark.parametrize("name", list(DEPRECATED))
def test_the_flat_attributes_of_version_1_still_read_with_a_deprecation_warning(name):
    data = _v1()
    result = StiffnessResult.from_dict(data)
    with pytest.warns(DeprecationWarning, match=f"StiffnessResult.{name} is deprecated.*result\\."):
        value = getattr(result, name)
    expected = data[name]
    if name in ("curves", "layer_curves"):
        expected = {key: {s: DistanceCurve(**c) for s, c in sides.items()} for key, sides in expected.items()}
    assert _same(value, expected), name
    with pytest.raises(AttributeError):
        setattr(result, name, {})


def test_the_flat_view_of_a_version_1_file_is_that_file():
    data = _v1()
    view = flat_view(StiffnessResult.from_dict(data))
    assert set(view) == set(DEPRECATED)
    for name, value in view.items():
        expected = data[name]
        if name in ("curves", "layer_curves"):
            expected = {key: {s: DistanceCurve(**c) for s, c in sides.items()} for key, sides in expected.items()}
        assert _same(value, expected), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the structure itself reads without warnings
        StiffnessResult.from_dict(data).scalars()


def _measured(representations=True):
    generator = torch.Generator().manual_seed(0)
    labels = {"train": torch.arange(3).repeat(4), "val": torch.arange(3).repeat(3)}
    inputs = {name: torch.randn(len(y), 5, generator=generator) for name, y in labels.items()}
    grads = {name: torch.randn(len(y), 7, generator=generator, dtype=torch.float64) for name, y in labels.items()}
    g = torch.cat([grads["train"], grads["val"]])
    parts = {"a": g[:, :3], "b": g[:, 3:]}
    layer_grams = {name: part @ part.T for name, part in parts.items()}
    outputs = {name: {"h": x * 2 + 1} for name, x in inputs.items()} if representations else None
    indices = {name: torch.arange(len(y)) for name, y in labels.items()}
    return measure_stiffness(
        g @ g.T, inputs, labels, indices, num_classes=3, num_distance_bins=4, layer_grams=layer_grams,
        representations=outputs,
    )  # fmt: skip


def test_a_measured_result_keeps_input_space_and_the_model_as_layers_like_the_others():
    result = _measured()
    assert result.pairs == ["train-train", "train-val", "val-val"]
    assert result.gram_layers == ["a", "b"] and result.representation_layers == ["h"]
    for pair in result.pairs:
        assert list(result.spaces[pair]) == [INPUT, "h"]
        for kind in result.kinds:
            by_layer = result.classes[pair][kind]
            assert list(by_layer) == [MODEL, "a", "b"]
            assert by_layer[MODEL].stiffness.shape == result.spaces[pair][INPUT].distances.shape
            for measures in by_layer.values():  # each layer's own class matrix, behind its within/between
                assert measures.matrix.shape == (3, 3)
                assert within_between(measures.matrix) == (measures.within, measures.between)
    tags = result.scalars()
    assert tags[layer_class_tag("train-val", "sign", "b", "within")] == result.classes["train-val"]["sign"]["b"].within
    assert _same(tags[critical_distance_tag("val-val", "h")], result.spaces["val-val"]["h"].critical_distance)
    assert _same(tags[critical_distance_tag("val-val")], result.spaces["val-val"][INPUT].critical_distance)


def test_a_layer_named_like_input_space_is_refused():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=generator), torch.arange(3).repeat(2)
    with pytest.raises(ValueError, match="'input'"):
        measure_stiffness(
            x @ x.T, {"train": x}, {"train": y}, {"train": torch.arange(6)}, num_classes=3,
            representations={"train": {"input": x}},
        )  # fmt: skip


def test_tags_are_built_from_the_structure_and_keep_their_names():
    assert class_tag("train-val", "cosine", "within", layer=MODEL) == "stiffness/train-val/cosine/within_class"
    assert (
        class_tag("train-val", "cosine", "between", "p", "net.0") == "p/train-val/cosine/by_layer/net.0/between_class"
    )
    assert layer_class_tag("train-val", "cosine", "net.0", "between", "p") == class_tag(
        "train-val", "cosine", "between", "p", "net.0"
    )
    assert critical_distance_tag("val-val", INPUT) == critical_distance_tag("val-val") == (
        "stiffness/val-val/critical_distance/input"
    )  # fmt: skip
    assert distance_curve_tag("val-val", INPUT) == distance_curve_tag("val-val") == "stiffness/val-val/distance_curve"
    assert distance_curve_tag("val-val", "net.1") == "stiffness/val-val/distance_curve/net.1"


def test_the_report_reads_a_version_1_run(tmp_path):
    raw = tmp_path / "run" / "version_0" / "stiffness"
    raw.mkdir(parents=True)
    shutil.copy(FIXTURE_V1, raw / "epoch=0-step=4.pt")
    data = _v1()
    for pair in ("train-val", "train-train"):  # the default pair, and one chosen
        report = write_report([tmp_path / "run"], tmp_path / pair, pair=pair if pair != "train-val" else None)
        text = report.read_text()
        assert text.startswith(f"# Stiffness report ({pair}; cosine)")
        assert f"{data['within_class'][f'{pair}/cosine']:.3f}" in text
        assert f"{data['layer_critical_distance'][f'{pair}/net.1']:.3f}" in text
