"""The runs a report reads: every directory holding saved probes, each with what its loggers wrote (losses and
hyperparameters, :mod:`.loggers`).

A run's raw results lie in ``{run}/{prefix}/epoch=E-step=S.pt``, where ``{run}`` is the first logger's run directory;
an MLflow logger's run holds a copy under ``artifacts/{prefix}``, a W&B logger's under ``files/{prefix}``. Such a copy
of a run found elsewhere is that run, not another one (the same bytes, or W&B's link to them); a copy alone (only the
``mlruns`` folder given) is a run of its own, at the MLflow or W&B run's directory.

A logger's files belong to a run when they are in its directory, hold its copy of the raw results, or are its W&B
run (by run id); any other logger directory under the paths given (a second logger's, e.g. a ``CSVLogger`` beside a
``TensorBoardLogger``) belongs to the run whose stiffness scalars it logged: the within-class stiffness it holds at
the probes' steps is the one the raw results hold.
"""

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import KINDS, MODEL, PAIRS, PREFIX, RAW_FILE_PATTERN, class_tag
from lightning_stiffness.report.loggers import (
    LOGGERS,
    LoggerFiles,
    find_logger_dirs,
    is_mlflow_run,
    is_wandb_run,
    read_logger,
    wandb_run_id,
)

_T = TypeVar("_T", "Run", "_Found")


@dataclass
class Run:
    """One run's saved probes (sorted by step), its logged losses and hyperparameters.

    Attributes:
        path: the run's directory.
        results: its probes, in step order.
        losses: tag -> ``(step, loss)`` points, each tag from the first of its loggers that has it
            (TensorBoard, CSV, MLflow, W&B).
        hparams: the hyperparameters, merged over its loggers (the first logger's value of each).
        loggers: what each of its loggers wrote (:class:`~lightning_stiffness.report.loggers.LoggerFiles`).
    """

    path: Path
    results: list[StiffnessResult]
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    loggers: list[LoggerFiles] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "-".join(self.path.parts[-2:])

    @property
    def steps(self) -> list[int]:
        """The global step of each probe."""
        return [r.step for r in self.results]

    def losses_of(self, logger: str) -> dict[str, list[tuple[int, float]]]:
        """The losses ``logger`` (one of :data:`~lightning_stiffness.report.loggers.LOGGERS`) holds for this run."""
        found: dict[str, list[tuple[int, float]]] = {}
        for files in self.loggers:
            if files.logger == logger:
                for tag, points in files.scalars.items():
                    if is_loss(tag):
                        found.setdefault(tag, points)
        return found


def is_loss(name: str, prefix: str = PREFIX) -> bool:
    """A logged loss at epoch level (``train_loss``, ``val_loss``, ``..._epoch``), not a step-level one, nor one of
    the callback's scalars."""
    ours = name.startswith((f"{prefix}/", f"{prefix}_intervals/", f"{PREFIX}/", f"{PREFIX}_intervals/"))
    return "loss" in name and not ours and not name.endswith("_step")


def _match_tags(prefix: str) -> set[str]:
    """The scalars that tie a logger's files to raw results: the within-class stiffness of each pair and kind."""
    return {class_tag(pair, kind, "within", prefix) for pair in PAIRS for kind in KINDS}


# ------------------------------------------------------------------------------------------------------ raw folders


@dataclass
class _RawFolder:
    """A ``{prefix}`` folder holding raw results: its run directory, and whether it is a logger's copy."""

    folder: Path
    owner: Path  # the run directory (for a copy: the MLflow or W&B run's)
    copy: bool
    fingerprint: tuple[tuple[str, str], ...]

    @property
    def links(self) -> set[Path]:
        """The folders its files link to (W&B's offline ``files/`` are links to the files saved)."""
        return {p.resolve().parent for p in self.folder.glob(RAW_FILE_PATTERN) if p.is_symlink()}


def _raw_folder(folder: Path) -> _RawFolder:
    owner, copy = folder.parent, False
    if owner.name == "artifacts" and is_mlflow_run(owner.parent):
        owner, copy = owner.parent, True
    elif owner.name == "files" and is_wandb_run(owner.parent):
        owner, copy = owner.parent, True
    files = sorted(folder.glob(RAW_FILE_PATTERN))
    fingerprint = tuple((f.name, hashlib.sha1(f.read_bytes()).hexdigest()) for f in files)
    return _RawFolder(folder, owner, copy, fingerprint)


def _raw_folders(paths: Sequence[str | Path], prefix: str) -> tuple[list[_RawFolder], list[Path]]:
    """Every raw folder under ``paths``, and the roots searched.

    Raises:
        ReportError: for a path that does not exist or holds no raw results.
    """
    folders: dict[Path, _RawFolder] = {}
    roots = []
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise ReportError(f"{root} does not exist.")
        depth = len(Path(prefix).parts)
        found = sorted({p.parents[depth - 1] for p in root.glob(f"**/{prefix}/{RAW_FILE_PATTERN}")})
        if not found:
            raise ReportError(
                f"no saved stiffness results under {root}: expected {prefix}/epoch=E-step=S.pt files, which "
                "StiffnessCallback writes under the logger's log_dir when save_raw=True."
            )
        roots.append(root)
        for folder in found:
            folders.setdefault(folder, _raw_folder(folder))
    return list(folders.values()), roots


def _common_depth(a: Path, b: Path) -> int:
    """How many leading path parts ``a`` and ``b`` share."""
    depth = 0
    for x, y in zip(a.resolve().parts, b.resolve().parts, strict=False):
        if x != y:
            break
        depth += 1
    return depth


@dataclass
class _Found:
    """A run being assembled: its directory, the raw folder read, and the logger runs holding its copies."""

    path: Path
    raw: _RawFolder
    copies: list[_RawFolder] = field(default_factory=list)


def _nearest(runs: list[_T], directory: Path) -> list[_T]:
    """Of several runs that hold the same numbers (reruns of one seed), those nearest ``directory`` in the tree."""
    if len(runs) < 2:
        return runs
    depth = [_common_depth(r.path, directory) for r in runs]
    return [r for r, d in zip(runs, depth, strict=True) if d == max(depth)]


def _fold(folders: list[_RawFolder]) -> list[_Found]:
    """One entry per run: each copy joins the run it copies (its own directory, the folder its links point to, or
    the one run with the same bytes); a copy of no run found is a run of its own."""
    runs = [_Found(f.owner, f) for f in folders if not f.copy]
    for copy in (f for f in folders if f.copy):
        same_dir = [r for r in runs if r.path == copy.owner]
        linked = [r for r in runs if r.raw.folder.resolve() in copy.links]
        same_bytes = _nearest([r for r in runs if r.raw.fingerprint == copy.fingerprint], copy.owner)
        home = same_dir or linked or (same_bytes if len(same_bytes) == 1 else [])
        if home:
            home[0].copies.append(copy)
        elif not any(r.path == copy.owner for r in runs):
            runs.append(_Found(copy.owner, copy))
    return sorted(runs, key=lambda r: str(r.path))


def find_runs(paths: Sequence[str | Path], prefix: str = PREFIX) -> list[Path]:
    """The directory of every run with ``{prefix}/epoch=*-step=*.pt`` at or below the given paths (the copies an
    MLflow or W&B logger keeps of a run found there are that run).

    Raises:
        ReportError: for a path that does not exist or holds no raw results.
    """
    return [found.path for found in _fold(_raw_folders(paths, prefix)[0])]


# ---------------------------------------------------------------------------------------------------------- loading


def _read_results(folder: Path) -> list[StiffnessResult]:
    files = sorted(folder.glob(RAW_FILE_PATTERN))
    results = [StiffnessResult.from_dict(torch.load(f, weights_only=True, map_location="cpu")) for f in files]
    return sorted(results, key=lambda r: r.step)


def _logged_within(result: StiffnessResult, prefix: str) -> dict[str, float]:
    out = {}
    for pair in result.pairs:
        for kind in result.kinds:
            out[class_tag(pair, kind, "within", prefix)] = result.classes[pair][kind][MODEL].within
    return out


def _matches(files: LoggerFiles, results: list[StiffnessResult], prefix: str) -> bool:
    """Whether ``files`` logged these probes' within-class stiffness (float32 precision) at their steps."""
    compared = 0
    for result in results:
        for tag, value in _logged_within(result, prefix).items():
            logged = [v for s, v in files.scalars.get(tag, []) if s == result.step]
            if not logged or not math.isfinite(value):
                continue
            if not math.isclose(logged[-1], value, rel_tol=1e-5, abs_tol=1e-6):
                return False
            compared += 1
    return compared > 0


def _merge(run: Run, prefix: str) -> None:
    """The run's losses and hyperparameters from its loggers, in the order of
    :data:`~lightning_stiffness.report.loggers.LOGGERS`."""
    run.loggers.sort(key=lambda files: (LOGGERS.index(files.logger), str(files.path)))
    for files in run.loggers:
        for tag, points in files.scalars.items():
            if is_loss(tag, prefix):
                run.losses.setdefault(tag, points)
        for key, value in files.hparams.items():
            run.hparams.setdefault(key, value)


def load_runs(paths: Sequence[str | Path], prefix: str = PREFIX) -> list[Run]:
    """Every run at or below ``paths`` (:func:`find_runs`) with its probes and what every logger under ``paths``
    wrote for it.

    Raises:
        ReportError: for a path that does not exist or holds no raw results.
    """
    folders, roots = _raw_folders(paths, prefix)
    found = _fold(folders)
    runs = [Run(f.path, _read_results(f.raw.folder)) for f in found]
    wanted = _match_tags(prefix)

    def want(tag: str) -> bool:
        return tag in wanted or is_loss(tag, prefix)

    places: dict[Path, Run] = {}
    for f, run in zip(found, runs, strict=True):
        for folder in (f.raw, *f.copies):
            places[folder.owner.resolve()] = run
    logger_dirs = sorted({entry for root in roots for entry in find_logger_dirs(root)}, key=str)
    for logger, directory in logger_dirs:
        files = read_logger(logger, directory, want, prefix)
        home = places.get(directory.resolve())
        if home is None and logger == "W&B":  # the W&B logger first: {save_dir}/{project}/{run id}
            home = next((r for r in runs if r.path.name == wandb_run_id(directory)), None)
        if home is None:
            matching = _nearest([r for r in runs if _matches(files, r.results, prefix)], directory)
            home = matching[0] if len(matching) == 1 else None
        if home is not None:
            home.loggers.append(files)
    for run in runs:
        _merge(run, prefix)
    return runs


def load_run(run_dir: str | Path, prefix: str = PREFIX) -> Run:
    """One run's probes (from ``{run_dir}/{prefix}``, or the copy in an MLflow run's ``artifacts/`` or a W&B run's
    ``files/``), with what the loggers in ``run_dir`` and below wrote for it."""
    run_dir = Path(run_dir)
    for folder in (run_dir / prefix, run_dir / "artifacts" / prefix, run_dir / "files" / prefix):
        if any(folder.glob(RAW_FILE_PATTERN)):
            break
    else:
        raise ReportError(f"no saved stiffness results in {run_dir / prefix}.")
    run = Run(run_dir, _read_results(folder))
    wanted = _match_tags(prefix)
    for logger, directory in find_logger_dirs(run_dir):
        run.loggers.append(read_logger(logger, directory, lambda tag: tag in wanted or is_loss(tag, prefix), prefix))
    _merge(run, prefix)
    return run
