"""A TensorBoard dashboard of the logged scalars: a custom-scalars layout (TensorBoard's ``custom_scalars`` plugin,
the "Custom Scalars" tab), written to each TensorBoard logger's event file with the first probe's scalars.

The default Scalars tab shows one card per tag, sorted by name, in one collapsed group per prefix. The layout shows
what a reader compares instead: within- and between-class stiffness of each pair on one chart, with their 95%
bootstrap intervals as margin bands (the ``{prefix}_intervals/...`` scalars); ξ of every distance space on one chart
per pair, with its interval; each layer's own stiffness; class groups; the whole training set; and the diagnostics
(probe time, gradient coherence and diversity, ξ's extrapolation flags) in a category of their own, last. The tags
are the logged ones (:mod:`~lightning_stiffness.names`); charts of tags of many names (the layers of ``per_layer``,
the probe sets of coherence) match them by regular expression, as the plugin allows.

TensorBoard reads one layout per run (the last written), so the layouts of several callbacks of one run are merged,
by category and chart title, and written again whole each time one is added.
"""

import re
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import Trainer
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lightning_stiffness.lightning_compat import lightning_classes
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import (
    GROUP_SIDES,
    INPUT,
    INTERVAL_ENDS,
    MODEL,
    SIDES,
    class_tag,
    critical_distance_tag,
    dataset_class_tag,
    group_tag,
    interval_tag,
    probe_seconds_tag,
)

#: The last category's name: diagnostics, shown closed.
DIAGNOSTICS = "diagnostics"


@dataclass(frozen=True)
class DashboardPlan:
    """What one callback logs, as far as its charts need to know (:meth:`of` reads it off its first result).

    Attributes:
        prefix: the tags' first part.
        pairs: the probed pairs (``train-train``, and with validation data ``train-val``, ``val-val``).
        kinds: the stiffness kinds.
        spaces: the distance spaces: ``input``, then the ``layers`` in network order.
        intervals: whether bootstrap intervals are logged (``num_bootstrap > 0``).
        per_layer: whether each layer's own stiffness is logged.
        groups: whether class-group stiffness is logged.
        dataset: whether the whole training set is measured.
    """

    prefix: str
    pairs: tuple[str, ...]
    kinds: tuple[str, ...]
    spaces: tuple[str, ...]
    intervals: bool
    per_layer: bool
    groups: bool
    dataset: bool

    @classmethod
    def of(cls, result: StiffnessResult, prefix: str, dataset: bool) -> "DashboardPlan":
        """The plan of a callback whose probes give results like ``result`` (and that measures the whole training
        set when ``dataset``)."""
        first = next(iter(result.spaces.values()), {})
        intervals = any(
            m.intervals for by_kind in result.classes.values() for m in (b[MODEL] for b in by_kind.values())
        )
        return cls(
            prefix=prefix,
            pairs=tuple(result.pairs),
            kinds=tuple(result.kinds),
            spaces=tuple(first) or (INPUT,),
            intervals=intervals,
            per_layer=bool(result.gram_layers),
            groups=bool(result.groups),
            dataset=dataset,
        )


def layout_categories(plan: DashboardPlan) -> list[layout_pb2.Category]:
    """The custom-scalars categories of one callback's scalars, in reading order (diagnostics last)."""
    p = plan.prefix
    within_between = [
        _chart(f"{pair} {kind}: within and between class", [class_tag(pair, kind, s, p) for s in SIDES], plan)
        for pair in plan.pairs
        for kind in plan.kinds
    ]
    xi = [
        _chart(f"{pair}: ξ by distance space", [critical_distance_tag(pair, s, p) for s in plan.spaces], plan)
        for pair in plan.pairs
    ]
    categories = [
        _category(f"{p}: within and between class", within_between),
        _category(f"{p}: critical distance ξ", xi),
    ]
    if plan.per_layer:
        charts = [
            _regex_chart(f"{pair} {kind}: {side} class, each layer's own", _by_layer_pattern(p, pair, kind, side))
            for pair in plan.pairs
            for kind in plan.kinds
            for side in SIDES
        ]
        categories.append(_category(f"{p}: by layer", charts))
    if plan.groups:
        charts = [
            _multiline(f"{pair} {kind}: between classes and groups", [group_tag(pair, kind, s, p) for s in GROUP_SIDES])
            for pair in plan.pairs
            for kind in plan.kinds
        ]
        categories.append(_category(f"{p}: class groups", charts))
    if plan.dataset:
        tags = [dataset_class_tag(side, p) for side in SIDES]
        categories.append(_category(f"{p}: whole training set", [_multiline("cosine: within and between class", tags)]))
    diagnostics = [
        _multiline("probe time (s)", [probe_seconds_tag(p)]),
        _regex_chart("gradient coherence by probe set", rf"^{re.escape(p)}/[^/]+/gradient_coherence$"),
        _regex_chart("gradient diversity by probe set", rf"^{re.escape(p)}/[^/]+/gradient_diversity$"),
        _regex_chart("ξ extrapolated (1) or observed (0)", rf"^{re.escape(p)}/[^/]+/critical_distance_extrapolated/"),
    ]
    categories.append(_category(f"{p}: {DIAGNOSTICS}", diagnostics, closed=True))
    return categories


#: Per run directory, the categories written so far (category title -> chart title -> chart), for merging.
_WRITTEN: dict[str, dict[str, dict[str, layout_pb2.Chart]]] = {}


def write_layout(trainer: Trainer, plan: DashboardPlan) -> int:
    """Add ``plan``'s charts to the layout of every TensorBoard logger of ``trainer`` (merged with the other
    callbacks' of its run) and write it; the number of loggers written to. Call on rank 0."""
    written = 0
    for logger in trainer.loggers:
        if isinstance(logger, lightning_classes("loggers", "TensorBoardLogger")):
            merged = _WRITTEN.setdefault(str(logger.log_dir), {})
            for category in layout_categories(plan):
                merged.setdefault(category.title, {}).update({chart.title: chart for chart in category.chart})
            layout = layout_pb2.Layout(
                category=[
                    layout_pb2.Category(title=title, chart=list(charts.values()), closed=title.endswith(DIAGNOSTICS))
                    for title, charts in merged.items()
                ]
            )
            experiment: Any = getattr(logger, "experiment")  # noqa: B009 - a TensorBoardLogger of either package
            # The writer's own file writer (torch's SummaryWriter and tensorboardX alike): `add_custom_scalars` can
            # only put one series in a margin chart, and within/between belong on one.
            experiment._get_file_writer().add_summary(_layout_summary(layout))
            experiment.flush()
            written += 1
    return written


def _layout_summary(layout: layout_pb2.Layout) -> Summary:
    """The summary the custom-scalars plugin reads its layout from (what its own ``summary.pb`` builds, without
    TensorFlow): the serialised layout as a string tensor under the plugin's config tag."""
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    plugin = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=plugin)])


def _by_layer_pattern(prefix: str, pair: str, kind: str, side: str) -> str:
    """The tags of every layer's own ``side`` stiffness (:func:`~lightning_stiffness.names.class_tag` with a
    layer)."""
    return rf"^{re.escape(f'{prefix}/{pair}/{kind}')}/by_layer/.*/{side}_class$"


def _chart(title: str, tags: list[str], plan: DashboardPlan) -> layout_pb2.Chart:
    """Lines of ``tags``: a margin chart with each tag's 95% interval as its band, or plain lines without
    intervals."""
    if not plan.intervals:
        return _multiline(title, tags)
    series = [
        layout_pb2.MarginChartContent.Series(
            value=tag,
            lower=interval_tag(tag, INTERVAL_ENDS[0], plan.prefix),
            upper=interval_tag(tag, INTERVAL_ENDS[1], plan.prefix),
        )
        for tag in tags
    ]
    return layout_pb2.Chart(title=title, margin=layout_pb2.MarginChartContent(series=series))


def _multiline(title: str, tags: list[str]) -> layout_pb2.Chart:
    return _regex_chart(title, "|".join(rf"^{re.escape(tag)}$" for tag in tags))


def _regex_chart(title: str, pattern: str) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[pattern]))


def _category(title: str, charts: list[layout_pb2.Chart], closed: bool = False) -> layout_pb2.Category:
    return layout_pb2.Category(title=title, chart=charts, closed=closed)
