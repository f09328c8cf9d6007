"""The TensorBoard dashboard: a custom-scalars layout in the event file, read back as TensorBoard reads it (the last
``custom_scalars__config__`` tensor of the run); within and between of each pair on one margin chart whose bands are
the logged interval ends, equal to the raw results' intervals; ξ by space; regular-expression charts that match the
logged tags; several callbacks of one run merged; plain lines without intervals."""

import re

import pytest
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT, MODEL, class_tag, critical_distance_tag, interval_tag
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer


def _layout(log_dir) -> tuple[layout_pb2.Layout, list[str]]:
    accumulator = events(log_dir)
    config = accumulator.Tensors("custom_scalars__config__")[-1]
    return layout_pb2.Layout.FromString(config.tensor_proto.string_val[0]), accumulator.Tags()["scalars"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    callbacks = [
        StiffnessCallback(
            samples_per_class=3, layers=["net.1"], per_layer=True, num_bootstrap=20, class_groups=[0] * 5 + [1] * 5,
            dataset_every_n_epochs=1, log_images=False,
        ),
        StiffnessCallback(samples_per_class=2, kinds=["sign"], prefix="plain", num_bootstrap=0, log_images=False),
    ]  # fmt: skip
    fit = trainer(root, callbacks, max_epochs=2)
    fit.fit(TinyNet(), datamodule=DigitsData())
    return fit.log_dir


def test_categories_in_reading_order_for_both_callbacks_with_diagnostics_closed(run):
    layout, _ = _layout(run)
    titles = [c.title for c in layout.category]
    assert titles == [
        "stiffness: within and between class",
        "stiffness: critical distance ξ",
        "stiffness: by layer",
        "stiffness: class groups",
        "stiffness: whole training set",
        "stiffness: diagnostics",
        "plain: within and between class",
        "plain: critical distance ξ",
        "plain: diagnostics",
    ]
    assert [c.closed for c in layout.category] == [t.endswith("diagnostics") for t in titles]


def test_margin_bands_are_the_logged_interval_ends_of_the_raw_results(run):
    layout, tags = _layout(run)
    charts = {chart.title: chart for chart in layout.category[0].chart}
    assert sorted(charts) == sorted(
        f"{pair} {kind}: within and between class"
        for pair in ("train-train", "train-val", "val-val")
        for kind in ("cosine", "sign")
    )
    accumulator = events(run)
    last = StiffnessResult.from_dict(raw_results(run)["epoch=1-step=8.pt"])
    for pair in last.pairs:
        chart = charts[f"{pair} cosine: within and between class"]
        values = [s.value for s in chart.margin.series]
        assert values == [class_tag(pair, "cosine", side) for side in ("within", "between")]
        for series, side in zip(chart.margin.series, ("within", "between"), strict=True):
            assert series.lower in tags and series.upper in tags
            low = accumulator.Scalars(series.lower)[-1]
            high = accumulator.Scalars(series.upper)[-1]
            assert low.step == high.step == 8
            expected = last.classes[pair]["cosine"][MODEL].intervals[side]
            assert (low.value, high.value) == pytest.approx(expected, rel=1e-6)
            assert low.value <= accumulator.Scalars(series.value)[-1].value <= high.value
    xi = {chart.title: chart for chart in layout.category[1].chart}["train-val: ξ by distance space"]
    assert [s.value for s in xi.margin.series] == [critical_distance_tag("train-val", s) for s in (INPUT, "net.1")]
    assert xi.margin.series[0].lower == interval_tag(critical_distance_tag("train-val"), "low")


def test_every_regular_expression_chart_matches_logged_tags(run):
    layout, tags = _layout(run)
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("multiline"):
                (pattern,) = chart.multiline.tag
                assert any(re.search(pattern, tag) for tag in tags), (category.title, chart.title, pattern)
            else:
                for series in chart.margin.series:
                    assert {series.value, series.lower, series.upper} <= set(tags), chart.title


def test_without_intervals_the_charts_are_plain_lines(run):
    layout, _ = _layout(run)
    plain = [c for c in layout.category if c.title.startswith("plain: ") and "diagnostics" not in c.title]
    assert plain and all(chart.HasField("multiline") for c in plain for chart in c.chart)
    assert not any(tag.startswith("plain_intervals/") for tag in events(run).Tags()["scalars"])
