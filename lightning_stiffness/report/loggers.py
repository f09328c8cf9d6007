"""What each logger wrote for a run, read back with that logger's own reader: the logged scalars (losses, and the
stiffness scalars that tie a logger's files to the raw results) and the hyperparameters.

- TensorBoard: the ``events.out.tfevents.*`` files with ``EventAccumulator`` (every point: ``size_guidance`` 0), the
  hyperparameters from the ``hparams.yaml`` beside them;
- CSV: ``metrics.csv`` with :mod:`csv` and ``hparams.yaml``;
- MLflow: a run of a file store (``mlruns/<experiment>/<run>``) with MLflow's ``FileStore`` (metric histories and
  params; the store is opened with ``MLFLOW_ALLOW_FILE_STORE=true`` for the read); the documented layout
  (``metrics/<name>``: ``timestamp value step`` lines, ``params/<name>``) without MLflow installed;
- W&B: an offline run (``wandb/offline-run-*``) with wandb's reader of its ``.wandb`` transaction log
  (``wandb leet inspect --json``: the history rows, at ``trainer/global_step``, and the config); where that reader is
  missing, the files a synced run has, ``files/config.yaml`` and ``files/wandb-summary.json`` (the last values only).
"""

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The loggers whose files are read, in the order their values are preferred when several hold the same run.
LOGGERS = ("TensorBoard", "CSV", "MLflow", "W&B")

#: Which scalars to read: a predicate on the tag.
Wanted = Callable[[str], bool]
Points = list[tuple[int, float]]


@dataclass
class LoggerFiles:
    """One logger's files of one run.

    Attributes:
        logger: one of :data:`LOGGERS`.
        path: the directory read (TensorBoard's and CSV's ``log_dir``, the MLflow run's directory, the W&B run's).
        scalars: the scalars read, by tag, as ``(step, value)`` in step order.
        hparams: the hyperparameters logged.
        note: what could not be read, or how it was read when not with the logger's own reader.
        raw_copy: the copy of the raw results inside the logger's run (MLflow ``artifacts/{prefix}``, W&B
            ``files/{prefix}``), if any.
    """

    logger: str
    path: Path
    scalars: dict[str, Points] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    raw_copy: Path | None = None


def is_mlflow_run(directory: Path) -> bool:
    """A run of an MLflow file store: ``meta.yaml`` beside ``metrics/`` (an experiment's folder has no ``metrics``)."""
    return (directory / "meta.yaml").is_file() and (directory / "metrics").is_dir()


def is_wandb_run(directory: Path) -> bool:
    """A W&B run directory (``wandb/offline-run-*`` or ``wandb/run-*``): its ``run-<id>.wandb`` log or its
    ``files/wandb-summary.json``."""
    name = directory.name
    if not (name.startswith("offline-run-") or name.startswith("run-")):
        return False
    return any(directory.glob("run-*.wandb")) or (directory / "files" / "wandb-summary.json").is_file()


def wandb_run_id(directory: Path) -> str:
    """The run id of a W&B run directory (``offline-run-20240101_120000-<id>``)."""
    return directory.name.rsplit("-", 1)[-1]


def find_logger_dirs(root: Path) -> list[tuple[str, Path]]:
    """Every logger directory at or below ``root``: ``(logger, directory)``, each once, sorted."""
    found: set[tuple[str, Path]] = set()
    candidates = [root, *(p for p in root.rglob("*") if p.is_dir())] if root.is_dir() else []
    for directory in candidates:
        if any(directory.glob("events.out.tfevents.*")):
            found.add(("TensorBoard", directory))
        if (directory / "metrics.csv").is_file():
            found.add(("CSV", directory))
        if is_mlflow_run(directory):
            found.add(("MLflow", directory))
        if is_wandb_run(directory):
            found.add(("W&B", directory))
    return sorted(found, key=lambda item: (str(item[1]), LOGGERS.index(item[0])))


def read_logger(logger: str, directory: Path, wanted: Wanted, prefix: str) -> LoggerFiles:
    """The files of one logger in ``directory``: the ``wanted`` scalars and the hyperparameters."""
    reader = {"TensorBoard": _tensorboard, "CSV": _csv, "MLflow": _mlflow, "W&B": _wandb}[logger]
    files = LoggerFiles(logger, directory)
    reader(files, wanted)
    for where in ("artifacts", "files"):
        copy = directory / where / prefix
        if logger in ("MLflow", "W&B") and copy.is_dir():
            files.raw_copy = copy
    for points in files.scalars.values():
        points.sort(key=lambda point: point[0])
    return files


# --------------------------------------------------------------------------------------------------- hyperparameters


class _TolerantLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads a tagged value Lightning could not dump plainly (``!!python/object:...``) as
    its tag, instead of failing."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
    return f"<{node.tag}>"


_TolerantLoader.add_multi_constructor("", _tagged)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping (``hparams.yaml``, ``config.yaml``); empty when the file is missing or holds no mapping."""
    if not path.is_file():
        return {}
    with open(path) as handle:
        data = yaml.load(handle, Loader=_TolerantLoader)
    return data if isinstance(data, dict) else {}


def parse_param(text: str) -> Any:
    """An MLflow param (saved as ``str(value)``) back as the value it was: numbers, booleans, None, lists."""
    if text == "None":
        return None
    try:
        return yaml.load(text, Loader=_TolerantLoader)
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------------------------------------- readers


def _tensorboard(files: LoggerFiles, wanted: Wanted) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(files.path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for tag in events.Tags().get("scalars", []):
        if wanted(tag):
            files.scalars[tag] = [(int(e.step), float(e.value)) for e in events.Scalars(tag)]
    files.hparams = read_yaml(files.path / "hparams.yaml")


def _csv(files: LoggerFiles, wanted: Wanted) -> None:
    with open(files.path / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key and value and wanted(key):
                    files.scalars.setdefault(key, []).append((int(float(step)), float(value)))
    files.hparams = read_yaml(files.path / "hparams.yaml")


@contextlib.contextmanager
def _file_store_allowed() -> Iterator[None]:
    """``MLFLOW_ALLOW_FILE_STORE=true`` while the block runs (MLflow 3 refuses to open a file store without it), then
    as it was."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ALLOW_FILE_STORE"]
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def _mlflow(files: LoggerFiles, wanted: Wanted) -> None:
    try:
        from mlflow.store.tracking.file_store import FileStore
    except ImportError:
        _mlflow_layout(files, wanted)
        files.note = "MLflow is not installed: metrics/ and params/ read as the file store lays them out"
        return
    with _file_store_allowed():
        store = FileStore(str(files.path.parent.parent))
        run = store.get_run(files.path.name)
        for key in run.data.metrics:
            if wanted(key):
                history = store.get_metric_history(run.info.run_id, key)
                files.scalars[key] = [(int(m.step), float(m.value)) for m in history]
        files.hparams = {key: parse_param(value) for key, value in run.data.params.items()}


def _mlflow_layout(files: LoggerFiles, wanted: Wanted) -> None:
    """The file store's documented layout: ``metrics/<name>`` (``timestamp value step`` per line, names with ``/``
    as folders) and ``params/<name>``."""
    metrics = files.path / "metrics"
    for path in sorted(p for p in metrics.rglob("*") if p.is_file()):
        key = path.relative_to(metrics).as_posix()
        if wanted(key):
            rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
            files.scalars[key] = [(int(row[2]), float(row[1])) for row in rows if len(row) >= 3]
    params = files.path / "params"
    for path in sorted(p for p in params.rglob("*") if p.is_file()):
        files.hparams[path.relative_to(params).as_posix()] = parse_param(path.read_text())


def _wandb(files: LoggerFiles, wanted: Wanted) -> None:
    log = next(iter(sorted(files.path.glob("run-*.wandb"))), None)
    records = _wandb_records(log) if log is not None else None
    if records is None:
        _wandb_files(files, wanted)
        return
    config: dict[str, Any] = {}
    for record in records:
        kind = record.get("type")
        if kind == "config":
            config.update(record.get("config", {}).get("update", {}))
        elif kind == "history":
            item = record.get("history", {}).get("item", {})
            step = item.get("trainer/global_step", item.get("_step"))
            if not isinstance(step, (int, float)):
                continue
            for key, value in item.items():
                if wanted(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    files.scalars.setdefault(key, []).append((int(step), float(value)))
    files.hparams = {key: value for key, value in config.items() if not key.startswith("_")}


def _wandb_records(log: Path) -> list[dict[str, Any]] | None:
    """The records of a ``.wandb`` transaction log as wandb's own reader prints them (``wandb leet inspect --json``,
    one JSON object a line); None when this wandb has no such reader or it fails."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
    env = {**os.environ, "WANDB_SILENT": "true"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    records = []
    for line in done.stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records or None


def _wandb_files(files: LoggerFiles, wanted: Wanted) -> None:
    """A W&B run without a readable transaction log: ``files/config.yaml`` (``{key: {value: ...}}``) and the last
    values of ``files/wandb-summary.json``, at its ``trainer/global_step``."""
    config = read_yaml(files.path / "files" / "config.yaml")
    files.hparams = {
        key: value.get("value") if isinstance(value, dict) else value
        for key, value in config.items()
        if not key.startswith("_") and key != "wandb_version"
    }
    summary_path = files.path / "files" / "wandb-summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    step = summary.get("trainer/global_step", summary.get("_step"))
    if isinstance(step, (int, float)):
        for key, value in summary.items():
            if wanted(key) and isinstance(value, (int, float)) and math.isfinite(value):
                files.scalars[key] = [(int(step), float(value))]
    files.note = (
        "W&B history not read (this wandb has no reader of the .wandb log, `wandb leet inspect`): only the config "
        "and the last values (files/config.yaml, files/wandb-summary.json)"
    )
