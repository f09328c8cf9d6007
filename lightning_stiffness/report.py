"""Offline report from the raw results runs saved: ``lightning-stiffness report RUN_DIR [RUN_DIR ...]``.

A run directory is a logger's directory (``lightning_logs/version_0``) holding ``stiffness/epoch=E-step=S.pt`` files
(``StiffnessCallback(save_raw=True)``, the default), or any folder above such directories: every run found under the
given paths is reported. The report is a directory with ``report.md`` (or ``report.html``) and PNG figures:

- class stiffness matrices of chosen probes, side by side;
- within/between-class stiffness against the global step, with the run's train/validation loss (from its
  TensorBoard event files or ``metrics.csv``), the stretch where validation loss rises above its minimum shaded;
- the critical distance xi against the global step, in input space and in each recorded layer;
- with several runs, xi at the last probe against each run's learning rate (from ``hparams.yaml``).

Probes are named as everywhere in this package (:func:`~lightning_stiffness.names.probe_label`): "initialisation"
for the probe before the first optimiser step, otherwise Lightning's 0-based epoch and the global step
("epoch 2, step 120"); ``--epochs 0 2`` picks the probes at the end of epochs 0 and 2, ``--epochs initialisation``
the first one. When a run has no probe in an epoch asked for, the report draws the nearest one and says so.
"""

import argparse
import csv
import html
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.images.specs import STIFFNESS_CMAP, new_figure
from lightning_stiffness.measures.intervals import interval_series
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import (
    FITS,
    INITIALISATION,
    KINDS,
    PAIRS,
    PREFIX,
    RAW_FILE_PATTERN,
    SIDES,
    class_tag,
    critical_distance_tag,
    kind_key,
    layer_key,
    probe_label,
)


@dataclass
class Run:
    """One run's saved probes (sorted by step), its logged losses and hyperparameters."""

    path: Path
    results: list[StiffnessResult]
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "-".join(self.path.parts[-2:])

    @property
    def steps(self) -> list[int]:
        """The global step of each probe."""
        return [r.step for r in self.results]


def find_runs(paths: Sequence[str | Path], prefix: str = PREFIX) -> list[Path]:
    """Every directory holding ``{prefix}/epoch=*-step=*.pt`` at or below the given paths."""
    runs: list[Path] = []
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise ReportError(f"{root} does not exist.")
        found = sorted({_run_dir(p, prefix) for p in root.glob(f"**/{prefix}/{RAW_FILE_PATTERN}")})
        if not found:
            raise ReportError(
                f"no saved stiffness results under {root}: expected {prefix}/epoch=E-step=S.pt files, which "
                "StiffnessCallback writes under the logger's log_dir when save_raw=True."
            )
        runs.extend(p for p in found if p not in runs)
    return runs


def _run_dir(raw_file: Path, prefix: str) -> Path:
    """The run directory of a raw result file ``{run}/{prefix}/epoch=E-step=S.pt``."""
    return raw_file.parents[len(Path(prefix).parts)]


def _is_loss(name: str) -> bool:
    """A logged loss at epoch level (``train_loss``, ``val_loss``, ``..._epoch``), not a step-level one."""
    return "loss" in name and not name.startswith(f"{PREFIX}/") and not name.endswith("_step")


def _read_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    losses: dict[str, list[tuple[int, float]]] = {}
    if list(run_dir.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            if _is_loss(tag):
                losses[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    elif (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if _is_loss(key) and value:
                        losses.setdefault(key, []).append((int(row["step"]), float(value)))
    return losses


def _read_hparams(run_dir: Path) -> dict:
    path = run_dir / "hparams.yaml"
    if not path.exists():
        return {}
    import yaml

    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir: Path, prefix: str = PREFIX) -> Run:
    """The probes a run saved under ``{run_dir}/{prefix}``, with its losses and hyperparameters."""
    files = sorted((run_dir / prefix).glob(RAW_FILE_PATTERN))
    results = [StiffnessResult.from_dict(torch.load(f, weights_only=True, map_location="cpu")) for f in files]
    results.sort(key=lambda r: r.step)
    return Run(path=run_dir, results=results, losses=_read_losses(run_dir), hparams=_read_hparams(run_dir))


@contextmanager
def _saved_figure(path: Path, width: float, height: float) -> Iterator[Figure]:
    """A figure to draw on, written to ``path`` when the block ends and then released."""
    with new_figure(width, height) as figure:
        yield figure
        figure.savefig(path, dpi=100)


def _class_matrices_figure(run: Run, chosen: list[StiffnessResult], pair: str, kind: str, path: Path) -> None:
    with _saved_figure(path, 4.2 * len(chosen) + 1.2, 4.6) as figure:
        image = None
        for i, result in enumerate(chosen):
            axes = figure.add_subplot(1, len(chosen), i + 1)
            matrix = result.class_matrices[kind_key(pair, kind)].double().numpy()
            image = axes.imshow(np.ma.masked_invalid(matrix), cmap=STIFFNESS_CMAP, vmin=-1, vmax=1)
            ticks = range(result.num_classes)
            axes.set_xticks(ticks)
            axes.set_yticks(ticks)
            axes.set_title(probe_label(result.epoch, result.step), fontsize=10)
            rows, cols = PAIRS[pair]
            axes.set_xlabel(f"class of the {cols} example")
            if i == 0:
                axes.set_ylabel(f"class of the {rows} example")
        figure.colorbar(image, ax=figure.axes, label=f"{kind} stiffness", shrink=0.8)
        figure.suptitle(f"class stiffness matrices, {pair}")


def _losses_axes(run: Run, axes) -> None:
    twin = axes.twinx()
    for tag, points in sorted(run.losses.items()):
        xs = [s for s, _ in points]
        twin.plot(xs, [v for _, v in points], linestyle=":", marker=".", label=tag)
        if "val" in tag and len(points) > 1:
            values = [v for _, v in points]
            best = int(np.argmin(values))
            if best < len(values) - 1:
                axes.axvspan(xs[best], xs[-1], color="orange", alpha=0.12, label="validation loss rising")
    twin.set_ylabel("loss")
    if run.losses:
        twin.legend(loc="upper right", fontsize=8)


def _stiffness_figure(run: Run, pair: str, path: Path) -> None:
    with _saved_figure(path, 8, 4.8) as figure:
        axes = figure.add_subplot()
        xs = run.steps
        for kind, style in zip(KINDS, ("-", "--"), strict=True):
            if kind not in run.results[-1].kinds:
                continue
            for side, colour in zip(SIDES, ("tab:blue", "tab:red"), strict=True):
                values = [getattr(r, f"{side}_class")[kind_key(pair, kind)] for r in run.results]
                axes.plot(xs, values, style, marker="o", markersize=3, color=colour, label=f"{kind}, {side} class")
                low, high = interval_series(run.results, class_tag(pair, kind, side, prefix=""))  # 95% bootstrap
                axes.fill_between(xs, low, high, color=colour, alpha=0.12, linewidth=0)
        _losses_axes(run, axes)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xlabel("global step (0: initialisation)")
        axes.set_ylabel("stiffness")
        axes.set_title(f"within/between-class stiffness, {pair}")
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(alpha=0.3)


def _xi_series(run: Run, pair: str) -> dict[str, list[float]]:
    series = {"input": [r.critical_distance[pair] for r in run.results]}
    for layer in run.results[-1].representation_layers:
        series[layer] = [r.layer_critical_distance.get(layer_key(pair, layer), math.nan) for r in run.results]
    return series


def _xi_figure(run: Run, pair: str, path: Path) -> None:
    with _saved_figure(path, 8, 4.8) as figure:
        axes = figure.add_subplot()
        for name, values in _xi_series(run, pair).items():
            (line,) = axes.plot(run.steps, values, marker="o", markersize=3, label=name)
            low, high = interval_series(run.results, critical_distance_tag(pair, None if name == "input" else name, ""))
            axes.fill_between(run.steps, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
        title = f"stiff-domain size against training, {pair} (same-class pairs)"
        _label_xi_axes(axes, "global step (0: initialisation)", title)


def _lr_figure(runs: list[Run], lrs: list[float], pair: str, path: Path) -> None:
    with _saved_figure(path, 7, 4.8) as figure:
        axes = figure.add_subplot()
        order = np.argsort(lrs)
        series = [_xi_series(runs[i], pair) for i in order]
        for name in series[0]:
            values = [s.get(name, [math.nan])[-1] for s in series]
            axes.plot([lrs[i] for i in order], values, marker="o", label=name)
        axes.set_xscale("log")
        title = f"stiff-domain size against learning rate, {pair}"
        _label_xi_axes(axes, "learning rate", title, " at the last probe")


def _label_xi_axes(axes, xlabel: str, title: str, ylabel_note: str = "") -> None:
    """Labels, legend and grid of a critical-distance plot."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel("critical distance ξ" + ylabel_note)
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)


def _pick(run: Run, epochs: Sequence[int | str] | None) -> tuple[list[StiffnessResult], list[str]]:
    """The probes to draw: for each epoch asked for, the last probe in it (``"initialisation"``: the first probe);
    the nearest one when there is none, with a note saying which was drawn."""
    results = run.results
    if epochs is None:
        return [results[i] for i in sorted({0, len(results) // 2, len(results) - 1})], []
    chosen, notes = [], []
    for wanted in epochs:
        if wanted == INITIALISATION:
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


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3f}"


def write_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    epochs: Sequence[int | str] | None = None,
    pair: str = "train-train",
    kind: str = "cosine",
    fmt: str = "md",
    lr_key: str = "lr",
    prefix: str = PREFIX,
) -> Path:
    """Write the report for the runs under ``paths`` into ``out_dir``; returns the report file's path.

    Raises:
        ReportError: for a path without saved results, or a ``pair`` or ``kind`` the results do not have.
    """
    if fmt not in ("md", "html"):
        raise ReportError(f"`fmt` must be 'md' or 'html', got {fmt!r}.")
    runs = [load_run(p, prefix) for p in find_runs(paths, prefix)]
    for run in runs:
        if pair not in run.results[-1].pairs:
            raise ReportError(f"{run.path} has no {pair!r} results; it has {run.results[-1].pairs}.")
        if kind not in run.results[-1].kinds:
            raise ReportError(f"{run.path} has no {kind!r} stiffness; it has {list(run.results[-1].kinds)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = [_FIT_NOTE]
    sections = [
        _run_section(run, f"run{index}", out, epochs, pair, kind, lr_key, notes) for index, run in enumerate(runs)
    ]
    lrs = [run.hparams.get(lr_key) for run in runs]
    if len(runs) > 1:
        if all(isinstance(v, (int, float)) for v in lrs):
            _lr_figure(runs, [float(v) for v in lrs], pair, out / "critical_distance_vs_lr.png")
            sections.append(
                ("all runs", [("critical distance against learning rate", "critical_distance_vs_lr.png")], [])
            )
        else:
            notes.append(f"No `{lr_key}` in every run's hparams.yaml: the plot against learning rate is left out.")
    report = out / f"report.{fmt}"
    report.write_text(
        _render_md(sections, pair, kind, notes) if fmt == "md" else _render_html(sections, pair, kind, notes)
    )
    return report


_FIT_NOTE = (
    "ξ: where the least-squares line through all same-class (distance, stiffness) pairs crosses zero (the paper's, "
    "logged as critical_distance); ξ bins: the same through the within-class bin means, each bin weighted equally."
)


def _run_section(
    run: Run,
    name: str,
    out: Path,
    epochs: Sequence[int | str] | None,
    pair: str,
    kind: str,
    lr_key: str,
    notes: list[str],
) -> tuple[str, list[tuple[str, str]], list[list[str]]]:
    """One run's figures (written to ``out``) and table: its section of the report; notes about it go to
    ``notes``."""
    chosen, picked_notes = _pick(run, epochs)
    notes += picked_notes
    _class_matrices_figure(run, chosen, pair, kind, out / f"{name}_class_matrices.png")
    _stiffness_figure(run, pair, out / f"{name}_stiffness.png")
    _xi_figure(run, pair, out / f"{name}_critical_distance.png")
    figures = [
        ("class stiffness matrices", f"{name}_class_matrices.png"),
        ("within/between-class stiffness and loss", f"{name}_stiffness.png"),
        ("critical distance", f"{name}_critical_distance.png"),
    ]
    layers = run.results[-1].representation_layers
    header = ["probe", "step", f"{kind} within", f"{kind} between", "ξ input", "ξ bins input"]
    rows = [[*header, *[f"ξ {x}" for x in layers]]]
    for r in run.results:
        rows.append(
            [
                probe_label(r.epoch, r.step),
                str(r.step),
                _fmt(r.within_class[kind_key(pair, kind)]),
                _fmt(r.between_class[kind_key(pair, kind)]),
                _fmt(r.critical_distance[pair]),
                _fmt(r.line_fits.get(pair, {}).get(FITS[1], {}).get("xi", math.nan)),
                *[_fmt(r.layer_critical_distance.get(layer_key(pair, layer), math.nan)) for layer in layers],
            ]
        )
    lr = run.hparams.get(lr_key)
    return f"{run.path}" + (f" ({lr_key} = {lr})" if lr is not None else ""), figures, rows


def _render_md(sections, pair: str, kind: str, notes: list[str]) -> str:
    lines = [f"# Stiffness report ({pair}, {kind})", ""]
    lines += [f"_{note}_" for note in notes]
    for title, figures, rows in sections:
        lines += ["", f"## {title}", ""]
        for caption, file in figures:
            lines += [f"![{caption}]({file})", ""]
        if rows:
            lines.append("| " + " | ".join(rows[0]) + " |")
            lines.append("|" + " --- |" * len(rows[0]))
            lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def _render_html(sections, pair: str, kind: str, notes: list[str]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Stiffness report</title></head><body>"]
    parts.append(f"<h1>Stiffness report ({html.escape(pair)}, {html.escape(kind)})</h1>")
    parts += [f"<p><em>{html.escape(note)}</em></p>" for note in notes]
    for title, figures, rows in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for caption, file in figures:
            parts.append(f"<figure><img src='{html.escape(file)}' alt='{html.escape(caption)}'></figure>")
        if rows:
            parts.append("<table border='1' cellpadding='3'>")
            parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _epoch_choice(text: str) -> int | str:
    if text in (INITIALISATION, "init"):
        return INITIALISATION
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number or '{INITIALISATION}', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-stiffness", description="Reports from saved stiffness results.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="write a report (Markdown or HTML with PNG figures) for runs")
    report.add_argument("runs", nargs="+", help="run directories (a logger's log_dir) or folders above them")
    report.add_argument("-o", "--out", default="stiffness-report", help="output directory (default: %(default)s)")
    report.add_argument(
        "--epochs",
        nargs="+",
        type=_epoch_choice,
        help="probes whose class matrices to show: Lightning's 0-based epochs (the probe at each one's end), or "
        f"'{INITIALISATION}'",
    )
    report.add_argument("--pair", default="train-train", choices=list(PAIRS), help="probe pair (default: %(default)s)")
    report.add_argument("--kind", default="cosine", choices=list(KINDS), help="stiffness kind for matrices")
    report.add_argument("--format", default="md", choices=["md", "html"], help="report format (default: %(default)s)")
    report.add_argument("--lr-key", default="lr", help="hparams.yaml key of the learning rate (default: %(default)s)")
    report.add_argument("--prefix", default=PREFIX, help="the callback's `prefix` (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = write_report(
            args.runs,
            args.out,
            epochs=args.epochs,
            pair=args.pair,
            kind=args.kind,
            fmt=args.format,
            lr_key=args.lr_key,
            prefix=args.prefix,
        )
    except ReportError as err:
        print(f"lightning-stiffness report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
