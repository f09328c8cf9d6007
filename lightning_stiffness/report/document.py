"""The report's document: the runs' figures and tables written into ``report.md`` or ``report.html``.

Its parts, in order: notes (how ξ is fitted, fallbacks, saturated measures, extrapolated ξ), the run-settings table,
the seeds aggregated (runs sharing every hyperparameter but the seed: means over seeds with 95% t-intervals), the
figure against the learning rate, then a section per run: class matrices, stiffness against distance, within/between
over training with the losses, ξ over training, and a table of every probe with its 95% bootstrap intervals.
"""

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.measures.fitted_lines import extrapolated
from lightning_stiffness.measures.records import DistanceMeasures, Interval
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import FITS, INITIALISATION, INPUT, KINDS, MODEL, PAIRS, PREFIX, SIDES, probe_label
from lightning_stiffness.report.figures import (
    KIND_STYLES,
    SIDE_COLOURS,
    Series,
    class_matrices_figure,
    distance_figure,
    lr_figure,
    space_colour,
    training_figure,
    xi_figure,
)
from lightning_stiffness.report.runs import Run, load_runs
from lightning_stiffness.report.seeds import SeedGroup, Summary, canonical, seed_groups, settings_key

#: The pair a report shows unless told otherwise (train-val: how a step on training examples moves validation ones).
DEFAULT_PAIR = "train-val"
#: Within/between-class stiffness this close to ±1 at every probe is saturated: it cannot show a change.
SATURATED = 0.995

Rows = list[list[str]]


@dataclass
class Section:
    """A part of the report: a heading, figures ``(caption, file)``, tables ``(caption, rows)`` (first row: the
    header) and paragraphs."""

    title: str
    level: int = 2
    figures: list[tuple[str, str]] = field(default_factory=list)
    tables: list[tuple[str, Rows]] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- arguments


def _pick(run: Run, epochs: Sequence[int | str] | None) -> tuple[list[StiffnessResult], list[str]]:
    """The probes to draw: for each epoch asked for, the last probe in it (``"initialisation"``: the first probe);
    the nearest one when there is none, with a note saying which was drawn."""
    results = run.results
    if epochs is None:
        return [results[i] for i in sorted({0, len(results) // 2, len(results) - 1})], []
    chosen: list[StiffnessResult] = []
    notes: list[str] = []
    for wanted in epochs:
        if isinstance(wanted, str):  # INITIALISATION, the only text `_check_epochs` lets through
            best = min(results, key=lambda r: r.step)
            exact = best.step == 0
        else:
            in_epoch = [r for r in results if r.epoch == wanted and r.step > 0]
            exact = bool(in_epoch)
            best = in_epoch[-1] if in_epoch else min(results, key=lambda r: (abs(r.epoch - wanted), -r.step))
        if not exact:
            asked = INITIALISATION if wanted == INITIALISATION else f"epoch {wanted}"
            drawn = probe_label(best.epoch, best.step)
            notes.append(f"{run.path}: no probe at {asked}; the nearest one, at {drawn}, is drawn instead.")
        if best not in chosen:
            chosen.append(best)
    return chosen, notes


def _check_epochs(epochs: Sequence[int | str] | None) -> None:
    """Check the epochs asked for before any run is read.

    Raises:
        ReportError: for an empty ``epochs``, or text in it other than ``"initialisation"``.
    """
    if epochs is None:
        return
    if len(epochs) == 0:
        raise ReportError("`epochs` is empty: give at least one epoch, or None for the first, middle and last probes.")
    for wanted in epochs:
        if isinstance(wanted, str) and wanted != INITIALISATION:
            raise ReportError(f"`epochs` must hold epoch numbers or {INITIALISATION!r}, got {wanted!r}.")


def _choose(run: Run, asked: str | None, default: str, have: list[str], what: str, notes: list[str]) -> str:
    """The pair (or kind) to show for ``run``: the one asked for (an error when the run lacks it), else ``default``,
    else the first the run has, with a note.

    Raises:
        ReportError: when ``asked`` is not among ``have``.
    """
    if asked is not None:
        if asked not in have:
            noun = "results" if what == "pair" else "stiffness"
            raise ReportError(f"{run.path} has no {asked!r} {noun}; it has {have}.")
        return asked
    if default in have:
        return default
    notes.append(f"{run.path} has no {default} {what}: its {have[0]} {what} is shown instead.")
    return have[0]


# ---------------------------------------------------------------------------------------------------- formatting


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _cell(value: float, interval: Interval | None = None) -> str:
    """``value [low, high]``, the interval where there is one."""
    if interval is None or not all(math.isfinite(end) for end in interval):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(interval[0])}, {_fmt(interval[1])}]"


def _summary_cell(summary: Summary) -> str:
    return _cell(summary.mean, (summary.low, summary.high))


def _fmt_xi(measures: DistanceMeasures | None, fit: str = FITS[0]) -> str:
    """ξ of one fit with its interval (the paper's fit only), marked "(extrapolated)" when it lies beyond the
    observed same-class distances."""
    if measures is None:
        return "–"
    line = measures.line_fits.get(fit, {})
    xi = measures.critical_distance if fit == FITS[0] else line.get("xi", math.nan)
    flag = extrapolated(xi, line.get("low", math.nan), line.get("high", math.nan))
    cell = _cell(xi, measures.interval) if fit == FITS[0] else _fmt(xi)
    return cell + (" (extrapolated)" if flag else "")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "–" if value is None else str(value)


# ---------------------------------------------------------------------------------------------------- the report


def write_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    epochs: Sequence[int | str] | None = None,
    pair: str | None = None,
    kind: str | None = None,
    fmt: str = "md",
    lr_key: str = "lr",
    seed_key: str = "seed",
    prefix: str = PREFIX,
) -> Path:
    """Write the report for the runs under ``paths`` into ``out_dir``; returns the report file's path.

    Args:
        paths: run directories or folders above them (give the folder holding every logger's files of the runs:
            their losses and hyperparameters are read from each, :mod:`.runs`).
        out_dir: where ``report.md`` / ``report.html`` and the PNG figures go.
        epochs: the probes whose class matrices and distance curves to draw (default: first, middle, last).
        pair: the pair of probe sets shown; default ``train-val``, or what a run has (with a note).
        kind: the stiffness kind of the class matrices and tables; default cosine, or what a run has (with a note).
        fmt: ``"md"`` or ``"html"``.
        lr_key, seed_key: the hyperparameters of the learning rate and of the seed.
        prefix: the callback's ``prefix``.

    Raises:
        ReportError: for a path without saved results, a ``pair`` or ``kind`` given that a run does not have, or
            ``epochs`` empty or holding text other than ``"initialisation"``.
    """
    if fmt not in ("md", "html"):
        raise ReportError(f"`fmt` must be 'md' or 'html', got {fmt!r}.")
    _check_epochs(epochs)
    runs = load_runs(paths, prefix)
    notes: list[str] = []
    shown: dict[int, tuple[str, str]] = {}
    for run in runs:
        last = run.results[-1]
        run_pair = _choose(run, pair, DEFAULT_PAIR, last.pairs, "pair", notes)
        run_kind = _choose(run, kind, "cosine", list(last.kinds), "kind", notes)
        shown[id(run)] = run_pair, run_kind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {id(run): f"run{index}" for index, run in enumerate(runs)}
    groups = seed_groups(runs, seed_key)
    sections = [_settings_section(runs, names, lr_key, seed_key)]
    for index, group in enumerate(g for g in groups if len(g.runs) > 1):
        sections.append(_group_section(group, f"seeds{index}", out, shown[id(group.runs[0])], runs, names, lr_key))
    sections += _lr_section(runs, groups, shown, out, lr_key, seed_key, notes)
    for run in runs:
        sections.append(_run_section(run, names[id(run)], out, epochs, *shown[id(run)], lr_key, seed_key, notes))
    notes += _measure_notes(runs, names, shown)
    pairs = sorted({p for p, _ in shown.values()}, key=list(PAIRS).index)
    kinds = sorted({k for _, k in shown.values()}, key=list(KINDS).index)
    title = f"Stiffness report ({', '.join(pairs)}; {', '.join(kinds)})"
    report = out / f"report.{fmt}"
    notes = [_FIT_NOTE, *dict.fromkeys(notes)]
    report.write_text(_render_md(title, notes, sections) if fmt == "md" else _render_html(title, notes, sections))
    return report


_FIT_NOTE = (
    "ξ: where the least-squares line through all same-class (distance, stiffness) pairs crosses zero (the paper's, "
    "logged as critical_distance); ξ bins: the same through the within-class bin means, each bin weighted equally. "
    "(extrapolated): the line crosses zero beyond the same-class distances it was fitted on (logged as "
    "critical_distance_extrapolated = 1), so that ξ is not a distance at which stiffness was seen to vanish. "
    "value [low, high]: the 95% bootstrap interval over the probe examples, where the run measured it."
)

_SEED_NOTE = (
    "Means over seeds: value [low, high] is the mean over the n seeds with its 95% Student-t interval "
    "(mean ± t(0.975, n − 1)·s/√n, s the standard deviation across seeds); with n = 1 there is no interval."
)


def _label(run: Run, keys: Sequence[str]) -> str:
    found = [f"{key} = {_value(run.hparams[key])}" for key in keys if key in run.hparams]
    return f" ({', '.join(found)})" if found else ""


def _model_class(run: Run) -> str:
    """The model's class where the hyperparameters name it (LightningCLI's ``_class_path``, or a ``model_class``,
    ``class_path``, ``model`` or ``arch`` hyperparameter); "–" otherwise (Lightning does not log it)."""
    for key in ("_class_path", "class_path", "model_class", "model", "arch"):
        value = run.hparams.get(key)
        if isinstance(value, str):
            return value if key in ("_class_path", "class_path", "model_class") else f"{key}: {value}"
    return "–"


def _per_class(result: StiffnessResult) -> str:
    """Examples per class of each probe set: ``train 10, val 10`` (a range where classes are short)."""
    parts = []
    for name, labels in result.labels.items():
        counts = torch.bincount(labels.long().flatten(), minlength=result.num_classes).tolist()
        low, high = min(counts), max(counts)
        parts.append(f"{name} {low}" if low == high else f"{name} {low}–{high}")
    return ", ".join(parts)


def _settings_section(runs: list[Run], names: dict[int, str], lr_key: str, seed_key: str) -> Section:
    header = ["run", "model", "examples per class", "epochs", seed_key, lr_key, "kinds", "probes", "intervals"]
    rows = [[*header, "loggers", "other hyperparameters", "directory"]]
    for run in runs:
        last = run.results[-1]
        intervals = any(by_layer[MODEL].intervals for by_kind in last.classes.values() for by_layer in by_kind.values())
        others = ", ".join(f"{k}={_value(v)}" for k, v in sorted(run.hparams.items()) if k not in (lr_key, seed_key))
        loggers = ", ".join(dict.fromkeys(files.logger for files in run.loggers)) or "–"
        rows.append(
            [
                names[id(run)],
                _model_class(run),
                _per_class(last),
                str(last.epoch + (1 if last.step > 0 else 0)),
                _value(run.hparams.get(seed_key)),
                _value(run.hparams.get(lr_key)),
                ", ".join(last.kinds),
                f"{len(run.results)} (steps {run.steps[0]}–{run.steps[-1]})",
                "95% bootstrap" if intervals else "none",
                loggers,
                others or "–",
                str(run.path),
            ]
        )
    paragraphs = [
        "epochs: trained up to the last probe; examples per class: the probe examples of each set; model: from the "
        "hyperparameters (LightningCLI's `_class_path`, or a `model_class` hyperparameter), '–' where none names it; "
        "loggers: whose files the losses and hyperparameters were read from."
    ]
    for run in runs:
        for files in run.loggers:
            if files.note:
                paragraphs.append(f"{names[id(run)]}, {files.logger} ({files.path}): {files.note}.")
    return Section("Run settings", tables=[("", rows)], paragraphs=paragraphs)


# ------------------------------------------------------------------------------------------------------ measures


def _xi(pair: str, space: str) -> Callable[[StiffnessResult], float]:
    def measure(result: StiffnessResult) -> float:
        measures = result.spaces.get(pair, {}).get(space)
        return math.nan if measures is None else measures.critical_distance

    return measure


def _side(pair: str, kind: str, side: str) -> Callable[[StiffnessResult], float]:
    def measure(result: StiffnessResult) -> float:
        by_layer = result.classes.get(pair, {}).get(kind)
        return math.nan if by_layer is None else by_layer[MODEL].value(side)

    return measure


def _series_label(kind: str, side: str) -> str:
    return f"{kind}, {side} class" if side == "within" else f"{kind}, between classes"


def _losses(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    return {tag: ([s for s, _ in points], [v for _, v in points]) for tag, points in run.losses.items()}


# ---------------------------------------------------------------------------------------------------- per run


def _run_section(
    run: Run,
    name: str,
    out: Path,
    epochs: Sequence[int | str] | None,
    pair: str,
    kind: str,
    lr_key: str,
    seed_key: str,
    notes: list[str],
) -> Section:
    """One run's figures (written to ``out``) and table; notes about it go to ``notes``."""
    chosen, picked_notes = _pick(run, epochs)
    notes += picked_notes
    class_matrices_figure(run, chosen, pair, kind, out / f"{name}_class_matrices.png")
    distance_figure(run, chosen, pair, out / f"{name}_distance.png")
    xs = run.steps
    kinds = [k for k in KINDS if k in run.results[-1].kinds]
    panels: dict[str, list[Series]] = {}
    for k in kinds:
        for side in SIDES:
            measures = [r.classes[pair][k][MODEL] for r in run.results]
            lows, highs = _interval_lists([m.intervals.get(side) for m in measures])
            style, marker = KIND_STYLES[k]
            panels.setdefault(k, []).append(
                Series(_series_label(k, side), xs, [m.value(side) for m in measures], lows, highs,
                       SIDE_COLOURS[side], style, marker)
            )  # fmt: skip
    training_figure(
        panels, _losses(run), f"within/between-class stiffness and loss, {pair}", out / f"{name}_stiffness.png"
    )
    spaces = [INPUT, *run.results[-1].representation_layers]
    xi_series: list[Series] = []
    for space in spaces:
        measures_at = [r.spaces[pair].get(space) for r in run.results]
        lows, highs = _interval_lists([m.interval if m else None for m in measures_at])
        values = [m.critical_distance if m else math.nan for m in measures_at]
        hollow = [bool(m and m.extrapolated) for m in measures_at]
        label = "input space" if space == INPUT else space
        xi_series.append(Series(label, xs, values, lows, highs, space_colour(len(xi_series)), hollow=hollow))
    xi_figure(xi_series, f"stiff-domain size ξ against training, {pair} (same-class pairs)", out / f"{name}_xi.png")
    figures = [
        (f"class stiffness matrices ({kind})", f"{name}_class_matrices.png"),
        ("stiffness against distance", f"{name}_distance.png"),
        ("within/between-class stiffness and loss over training", f"{name}_stiffness.png"),
        ("critical distance ξ over training", f"{name}_xi.png"),
    ]
    layers = run.results[-1].representation_layers
    header = ["probe", "step", f"{kind} within", f"{kind} between", "ξ input", "ξ bins input"]
    rows = [[*header, *[f"ξ {x}" for x in layers]]]
    for r in run.results:
        whole, spaces_at = r.classes[pair][kind][MODEL], r.spaces[pair]
        rows.append(
            [
                probe_label(r.epoch, r.step),
                str(r.step),
                _cell(whole.within, whole.intervals.get("within")),
                _cell(whole.between, whole.intervals.get("between")),
                _fmt_xi(spaces_at.get(INPUT)),
                _fmt_xi(spaces_at.get(INPUT), FITS[1]),
                *[_fmt_xi(spaces_at.get(layer)) for layer in layers],
            ]
        )
    title = f"{name}: {run.path}{_label(run, (lr_key, seed_key))}"
    return Section(title, figures=figures, tables=[(f"every probe, {pair}", rows)])


def _interval_lists(intervals: list[Interval | None]) -> tuple[list[float], list[float]]:
    lows = [i[0] if i and math.isfinite(i[0]) else math.nan for i in intervals]
    highs = [i[1] if i and math.isfinite(i[1]) else math.nan for i in intervals]
    return lows, highs


def _measure_notes(runs: list[Run], names: dict[int, str], shown: dict[int, tuple[str, str]]) -> list[str]:
    """Notes on what the numbers cannot say: a within/between measure at ±1 at every probe (saturated), and ξ
    extrapolated; each note names the runs it holds for."""
    saturated: dict[tuple[str, str, str, str], list[str]] = {}
    # (pair, space label) -> [probes extrapolated, probes, runs with one]: totals over runs keep the note a few
    # lines however many runs the report holds (each run's table marks its own probes)
    extrapolated: dict[tuple[str, str], list[int]] = {}
    for run in runs:
        name, pair = names[id(run)], shown[id(run)][0]
        for kind in run.results[-1].kinds:
            for side in SIDES:
                values = [r.classes[pair][kind][MODEL].value(side) for r in run.results if kind in r.classes[pair]]
                if values and all(math.isfinite(v) and abs(v) >= SATURATED for v in values):
                    saturated.setdefault((kind, side, pair, f"{values[0]:.2f}"), []).append(name)
        for space in [INPUT, *run.results[-1].representation_layers]:
            count = sum(bool(m and m.extrapolated) for m in (r.spaces[pair].get(space) for r in run.results))
            totals = extrapolated.setdefault((pair, "input space" if space == INPUT else space), [0, 0, 0])
            totals[0] += count
            totals[1] += len(run.results)
            totals[2] += bool(count)
    notes = []
    for (kind, side, pair, value), which in saturated.items():
        why = " (every same-class gradient pair agrees in sign)" if kind == "sign" and side == "within" else ""
        notes.append(
            f"Saturated: {kind} {side}-class stiffness ({pair}) is {value} at every probe of {', '.join(which)}{why}; "
            "it cannot show a change: read the cosine stiffness."
        )
    flagged = [
        f"{label} ({pair}) at {count} of {probes} probes"
        + (f" in {with_one} of {len(runs)} runs" if len(runs) > 1 else "")
        for (pair, label), (count, probes, with_one) in extrapolated.items()
        if count
    ]
    if flagged:
        where = f"{names[id(runs[0])]}" if len(runs) == 1 else "the runs"
        notes.append(
            "ξ extrapolated (the line through the same-class pairs crosses zero beyond the distances measured: a "
            f"trend, not a distance where stiffness was seen to vanish) in {where}: {'; '.join(flagged)}; "
            "the tables mark each such probe."
        )
    return notes


# ---------------------------------------------------------------------------------------------------- seeds


def _varying(runs: Sequence[Run], ignore: Sequence[str]) -> list[str]:
    """The hyperparameters (but ``ignore``) whose values differ between ``runs``, sorted."""
    keys = sorted({key for run in runs for key in run.hparams if key not in ignore})
    return [key for key in keys if len({repr(canonical(run.hparams.get(key))) for run in runs}) > 1]


def _group_title(group: SeedGroup, runs: list[Run], seed_key: str) -> str:
    keys = _varying(runs, (seed_key,))
    shared = ", ".join(f"{key} = {_value(group.runs[0].hparams.get(key))}" for key in keys)
    seeds = ", ".join(_value(seed) for seed in group.seeds)
    return f"{shared or 'same settings'}: {len(group.runs)} seeds ({seed_key} {seeds})"


def _summary_series(group: SeedGroup, label: str, measure, **style) -> Series:
    summaries = group.over_training(measure)
    xs = [float(step) for step in group.steps]
    return Series(
        label, xs, [s.mean for s in summaries], [s.low for s in summaries], [s.high for s in summaries], **style
    )


def _group_section(
    group: SeedGroup,
    name: str,
    out: Path,
    shown: tuple[str, str],
    runs: list[Run],
    names: dict[int, str],
    lr_key: str,
) -> Section:
    """The seeds of one group aggregated: means over seeds with their t-intervals, over training."""
    pair, kind = shown
    kinds = [k for k in KINDS if all(k in run.results[-1].kinds for run in group.runs)]
    panels = {
        k: [
            _summary_series(group, _series_label(k, side), _side(pair, k, side),
                            colour=SIDE_COLOURS[side], linestyle=KIND_STYLES[k][0], marker=KIND_STYLES[k][1])
            for side in SIDES
        ]
        for k in kinds
    }  # fmt: skip
    title = f"within/between-class stiffness and loss, {pair}: mean over {len(group.runs)} seeds"
    training_figure(panels, group.losses(), title, out / f"{name}_stiffness.png", " (mean over seeds)")
    spaces = [INPUT, *group.runs[0].results[-1].representation_layers]
    xi_series = [
        _summary_series(group, "input space" if space == INPUT else space, _xi(pair, space), colour=space_colour(i))
        for i, space in enumerate(spaces)
    ]
    xi_title = f"stiff-domain size ξ against training, {pair}: mean over {len(group.runs)} seeds"
    xi_figure(xi_series, xi_title, out / f"{name}_xi.png")
    header = ["step", "seeds", f"{kind} within", f"{kind} between", *[f"ξ {s}" for s in spaces]]
    rows = [header]
    columns = [
        group.over_training(_side(pair, kind, "within")),
        group.over_training(_side(pair, kind, "between")),
        *[group.over_training(_xi(pair, space)) for space in spaces],
    ]
    for i, step in enumerate(group.steps):
        rows.append([str(step), str(columns[0][i].n), *[_summary_cell(column[i]) for column in columns]])
    seed_key = group.seed_key
    members = ", ".join(f"{names[id(run)]} ({seed_key} {_value(run.hparams.get(seed_key))})" for run in group.runs)
    return Section(
        f"Seeds aggregated — {_group_title(group, runs, seed_key)}",
        figures=[
            ("within/between-class stiffness over training, mean over seeds", f"{name}_stiffness.png"),
            ("critical distance ξ over training, mean over seeds", f"{name}_xi.png"),
        ],
        tables=[(f"mean over seeds [95% t-interval], {pair}, at the steps every seed probed", rows)],
        paragraphs=[f"Runs: {members}. {_SEED_NOTE}"],
    )


def _lr_section(
    runs: list[Run],
    groups: list[SeedGroup],
    shown: dict[int, tuple[str, str]],
    out: Path,
    lr_key: str,
    seed_key: str,
    notes: list[str],
) -> list[Section]:
    """ξ and within/between at the last probe against the learning rate: a point per group of seeds (its mean, with
    the t-interval as error bars), a line per setting of the other hyperparameters."""
    if len(runs) < 2:
        return []
    lrs: list[Any] = [run.hparams.get(lr_key) for run in runs]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lrs):
        notes.append(f"No `{lr_key}` in every run's hyperparameters: the figure against the learning rate is left out.")
        return []
    if len({float(v) for v in lrs}) < 2:
        return []
    pair, kind = shown[id(runs[0])]
    lines: dict[tuple, list[SeedGroup]] = {}
    for group in groups:
        lines.setdefault(settings_key(group.runs[0], (seed_key, lr_key)), []).append(group)
    varying = _varying(runs, (seed_key, lr_key))
    spaces = [INPUT, *runs[0].results[-1].representation_layers]
    xi, sides = [], []
    rows = [[lr_key, "seeds", f"{kind} within", f"{kind} between", *[f"ξ {s}" for s in spaces]]]
    if varying:
        rows[0].insert(0, ", ".join(varying))
    for members in lines.values():
        members = sorted(members, key=lambda g: float(g.runs[0].hparams[lr_key]))
        xs = [float(g.runs[0].hparams[lr_key]) for g in members]
        tag = ", ".join(f"{k}={_value(members[0].runs[0].hparams.get(k))}" for k in varying)
        suffix = f" ({tag})" if tag else ""
        for i, space in enumerate(spaces):
            at = [g.at_last(_xi(pair, space)) for g in members]
            colour = space_colour(i) if not varying else None
            xi.append(
                Series(
                    f"ξ {space}{suffix}", xs, [s.mean for s in at], [s.low for s in at], [s.high for s in at], colour
                )
            )
        for side in SIDES:
            at = [g.at_last(_side(pair, kind, side)) for g in members]
            style, marker = KIND_STYLES[kind]
            label = _series_label(kind, side) + suffix
            sides.append(
                Series(label, xs, [s.mean for s in at], [s.low for s in at], [s.high for s in at],
                       SIDE_COLOURS[side] if not varying else None, style, marker)
            )  # fmt: skip
        for g, x in zip(members, xs, strict=True):
            cells = [
                g.at_last(_side(pair, kind, "within")),
                g.at_last(_side(pair, kind, "between")),
                *[g.at_last(_xi(pair, space)) for space in spaces],
            ]
            rows.append([*([tag] if varying else []), f"{x:g}", str(len(g.runs)), *[_summary_cell(c) for c in cells]])
    several = any(len(g.runs) > 1 for g in groups)
    note = "mean over seeds, error bars: 95% t-interval across seeds" if several else "one run per point"
    lr_figure(
        xi, sides, f"against the learning rate, {pair}, at the last probe", note, out / "critical_distance_vs_lr.png"
    )
    paragraphs = [_SEED_NOTE] if several else []
    return [
        Section(
            "All runs: against the learning rate",
            figures=[("critical distance and stiffness against learning rate", "critical_distance_vs_lr.png")],
            tables=[(f"at the last probe every seed reached, {pair}", rows)],
            paragraphs=paragraphs,
        )
    ]


# ---------------------------------------------------------------------------------------------------- rendering


def _render_md(title: str, notes: list[str], sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- _{note}_" for note in notes]
    for section in sections:
        lines += ["", f"{'#' * section.level} {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for caption, file in section.figures:
            lines += [f"![{caption}]({file})", ""]
        for caption, rows in section.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines.append("| " + " | ".join(rows[0]) + " |")
            lines.append("|" + " --- |" * len(rows[0]))
            lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
            lines.append("")
    return "\n".join(lines) + "\n"


def _render_html(title: str, notes: list[str], sections: list[Section]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Stiffness report</title></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts += ["<ul>", *[f"<li><em>{html.escape(note)}</em></li>" for note in notes], "</ul>"]
    for section in sections:
        level = section.level
        parts.append(f"<h{level}>{html.escape(section.title)}</h{level}>")
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.paragraphs]
        for caption, file in section.figures:
            parts.append(
                f"<figure><img src='{html.escape(file)}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        for caption, rows in section.tables:
            parts.append("<table border='1' cellpadding='3'>")
            if caption:
                parts.append(f"<caption>{html.escape(caption)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
