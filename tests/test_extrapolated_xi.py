"""ξ says when it is extrapolated: a zero crossing beyond the same-class distances its line was fitted on is marked as
such beside the logged scalar (``critical_distance_extrapolated``: 1, 0, or NaN without ξ), in the raw results, in
the ξ-by-layer image and in the report's table; ξ itself stays the number a monitor reads."""

import math

import pytest
import torch

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.images.specs import probe_specs
from lightning_stiffness.measures.fitted_lines import extrapolated, line_fits
from lightning_stiffness.measures.functional import DistanceCurve, LineFitSums, line_sum_vector
from lightning_stiffness.measures.records import DistanceMeasures
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT, critical_distance_by_layer_tag, critical_distance_tag, extrapolated_tag
from lightning_stiffness.report import write_report
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer


@pytest.mark.parametrize(
    ("xi", "low", "high", "expected"),
    [
        (0.5, 0.1, 1.2, False),
        (0.1, 0.1, 1.2, False),  # on the edge: observed
        (1.5, 0.1, 1.2, True),
        (0.05, 0.1, 1.2, True),
        (221.0, 0.0, 2.0, True),  # beyond what 1 - cos can ever be
        (math.nan, 0.1, 1.2, None),
        (math.inf, 0.1, 1.2, None),
        (0.5, math.nan, math.nan, None),
    ],
)
def test_extrapolated_compares_xi_with_the_observed_range(xi, low, high, expected):
    assert extrapolated(xi, low, high) is expected


def _measures(distances: list[float], stiffness: list[float]) -> DistanceMeasures:
    """Distance measures of same-class points (d, s), binned in [0, 2] (10 bins), with both fitted lines."""
    d, s = torch.tensor(distances, dtype=torch.float64), torch.tensor(stiffness, dtype=torch.float64)
    edges = torch.linspace(0, 2, 11, dtype=torch.float64)
    bins = torch.bucketize(d, edges[1:-1], right=True)
    count = torch.bincount(bins, minlength=10)
    mean = torch.zeros(10, dtype=torch.float64).index_add_(0, bins, s) / count.clamp_min(1)
    within = DistanceCurve(edges, torch.where(count > 0, mean, torch.nan), count)
    sums = LineFitSums(*line_sum_vector(d, s).tolist())
    fits = line_fits(sums, within)
    return DistanceMeasures(d[None, :], {"within": within, "between": within}, fits["pairs"]["xi"], fits)


def test_a_distance_measure_knows_whether_its_xi_is_extrapolated_and_the_raw_dict_says_so():
    inside = _measures([0.1, 0.5, 0.9, 1.3], [0.8, 0.4, 0.0, -0.4])  # the line crosses zero at 0.9
    beyond = _measures([0.1, 0.3, 0.5], [0.9, 0.8, 0.7])  # at 1.9, past the last point's bin
    rising = _measures([0.1, 0.3, 0.5], [0.1, 0.2, 0.3])  # no ξ
    assert inside.critical_distance == pytest.approx(0.9) and inside.extrapolated is False
    assert beyond.critical_distance == pytest.approx(1.9) and beyond.extrapolated is True
    assert math.isnan(rising.critical_distance) and rising.extrapolated is None
    for measures in (inside, beyond, rising):
        data = measures.to_dict()
        assert data["extrapolated"] is measures.extrapolated
        again = DistanceMeasures.from_dict(data)
        assert again.extrapolated is measures.extrapolated and again.line_fits == measures.line_fits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xi")
    callback = StiffnessCallback(samples_per_class=4, layers=["net.1"], num_bootstrap=0)
    fit = trainer(root, [callback], max_epochs=2)
    fit.fit(TinyNet(), datamodule=DigitsData())
    return root, fit.log_dir


def test_the_flag_is_logged_beside_each_xi_and_agrees_with_the_raw_results(run):
    _, log_dir = run
    logged = events(log_dir)
    raw = raw_results(log_dir)
    assert len(raw) == 3
    flags = []
    for index, name in enumerate(sorted(raw, key=lambda n: StiffnessResult.from_dict(raw[n]).step)):
        result = StiffnessResult.from_dict(raw[name])
        for pair in result.pairs:
            for space in (INPUT, "net.1"):
                measures = result.spaces[pair][space]
                fit = measures.line_fits["pairs"]
                expected = extrapolated(measures.critical_distance, fit["low"], fit["high"])
                assert raw[name]["spaces"][pair][space]["extrapolated"] is expected
                value = logged.Scalars(extrapolated_tag(pair, space))[index].value
                xi = logged.Scalars(critical_distance_tag(pair, space))[index].value
                if expected is None:
                    assert math.isnan(value)
                else:
                    assert value == float(expected)
                    assert xi == pytest.approx(measures.critical_distance, rel=1e-6)
                flags.append(expected)
    assert True in flags  # the digits demo's input-space ξ lies beyond its observed distances


def test_the_xi_by_layer_image_and_the_report_mark_extrapolated_values(run, tmp_path):
    root, log_dir = run
    raw = raw_results(log_dir)
    result = StiffnessResult.from_dict(raw["epoch=1-step=8.pt"])
    spec = probe_specs(result, [str(c) for c in range(10)])[critical_distance_by_layer_tag("train-train")]
    assert spec.extrapolated == tuple(result.spaces["train-train"][space].extrapolated for space in spec.names)
    report = write_report([root], tmp_path / "report", pair="train-train").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| epoch") or line.startswith("| init")]
    assert len(rows) == 3
    for line, name in zip(rows, ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt"], strict=True):
        measures = StiffnessResult.from_dict(raw[name]).spaces["train-train"][INPUT]
        cell = line.split("|")[5].strip()
        assert cell.endswith("(extrapolated)") is bool(measures.extrapolated), (cell, measures.extrapolated)
    assert "critical_distance_extrapolated = 1" in report
