"""The runs a report reads: every directory holding saved probes, each with its logged losses and hyperparameters."""

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_stiffness.exceptions import ReportError
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import (
    PREFIX,
    RAW_FILE_PATTERN,
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
