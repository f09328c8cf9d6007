"""The report's document: the runs' figures and tables written into ``report.md`` or ``report.html``."""

import html
import math
from collections.abc import Sequence
from pathlib import Path

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.measures.fitted_lines import extrapolated
from lightning_stiffness.measures.records import DistanceMeasures
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import FITS, INITIALISATION, INPUT, MODEL, PREFIX, probe_label
from lightning_stiffness.report.figures import class_matrices_figure, lr_figure, stiffness_figure, xi_figure
from lightning_stiffness.report.runs import Run, find_runs, load_run


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


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3f}"


def _fmt_xi(measures: DistanceMeasures | None, fit: str = FITS[0]) -> str:
    """ξ of one fit, marked "(extrapolated)" when it lies beyond the observed same-class distances."""
    if measures is None:
        return "–"
    line = measures.line_fits.get(fit, {})
    xi = measures.critical_distance if fit == FITS[0] else line.get("xi", math.nan)
    flag = extrapolated(xi, line.get("low", math.nan), line.get("high", math.nan))
    return _fmt(xi) + (" (extrapolated)" if flag else "")


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
        ReportError: for a path without saved results, a ``pair`` or ``kind`` the results do not have, or
            ``epochs`` empty or holding text other than ``"initialisation"``.
    """
    if fmt not in ("md", "html"):
        raise ReportError(f"`fmt` must be 'md' or 'html', got {fmt!r}.")
    _check_epochs(epochs)
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
    lrs = [float(v) for v in (run.hparams.get(lr_key) for run in runs) if isinstance(v, (int, float))]
    if len(runs) > 1:
        if len(lrs) == len(runs):  # every run has a numeric learning rate
            lr_figure(runs, lrs, pair, out / "critical_distance_vs_lr.png")
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
    "logged as critical_distance); ξ bins: the same through the within-class bin means, each bin weighted equally. "
    "(extrapolated): the line crosses zero beyond the same-class distances it was fitted on (logged as "
    "critical_distance_extrapolated = 1), so that ξ is not a distance at which stiffness was seen to vanish."
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
    class_matrices_figure(run, chosen, pair, kind, out / f"{name}_class_matrices.png")
    stiffness_figure(run, pair, out / f"{name}_stiffness.png")
    xi_figure(run, pair, out / f"{name}_critical_distance.png")
    figures = [
        ("class stiffness matrices", f"{name}_class_matrices.png"),
        ("within/between-class stiffness and loss", f"{name}_stiffness.png"),
        ("critical distance", f"{name}_critical_distance.png"),
    ]
    layers = run.results[-1].representation_layers
    header = ["probe", "step", f"{kind} within", f"{kind} between", "ξ input", "ξ bins input"]
    rows = [[*header, *[f"ξ {x}" for x in layers]]]
    for r in run.results:
        whole, spaces = r.classes[pair][kind][MODEL], r.spaces[pair]
        rows.append(
            [
                probe_label(r.epoch, r.step),
                str(r.step),
                _fmt(whole.within),
                _fmt(whole.between),
                _fmt_xi(spaces[INPUT]),
                _fmt_xi(spaces[INPUT], FITS[1]),
                *[_fmt_xi(spaces.get(layer)) for layer in layers],
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
