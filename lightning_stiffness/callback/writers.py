"""Writers of a probe's result: scalars (every logger, and Lightning's monitors) and raw files; images are written by
:class:`~lightning_stiffness.images.image_writer.ImageWriter`. One job each.

Each probe is its own point at its own step: scalars go to the loggers directly (as ``LearningRateMonitor`` does),
because ``pl_module.log`` would merge the probe at initialisation with the one at the end of epoch 0. Monitors get
the latest probe's values at every check (:meth:`ScalarWriter.publish`), so they find them until the next probe.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_stiffness.callback.dashboard import DashboardPlan, write_layout
from lightning_stiffness.lightning_compat import lightning_classes
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.measures.whole_dataset import DatasetResult
from lightning_stiffness.names import PREFIX, dataset_raw_file_name, probe_seconds_tag, raw_file_name


class ScalarWriter:
    """Scalars to every logger at the probe's step; the latest probe's values to ``pl_module.log`` for monitors.

    Args:
        prefix: the tags' first part.
        dataset: whether the whole training set is measured too (for the TensorBoard layout).
    """

    def __init__(self, prefix: str = PREFIX, dataset: bool = False) -> None:
        self.prefix, self.dataset = prefix, dataset
        self.latest: dict[str, float] = {}
        self._laid_out = False

    def write(self, trainer: Trainer, result: StiffnessResult, seconds: float) -> None:
        """Log ``result``'s scalars, the ends of its intervals and the probe's duration, and keep the scalars for
        :meth:`publish`; with the first result, the TensorBoard layout of them all
        (:mod:`~lightning_stiffness.callback.dashboard`)."""
        scalars = result.scalars(self.prefix)
        logged = {**scalars, **result.interval_scalars(self.prefix), probe_seconds_tag(self.prefix): seconds}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=result.step)
        self.latest = scalars
        if not self._laid_out and trainer.is_global_zero:
            write_layout(trainer, DashboardPlan.of(result, self.prefix, self.dataset))
        self._laid_out = True

    def write_dataset(self, trainer: Trainer, result: DatasetResult) -> None:
        """Log the whole training set's scalars at its step (its own point: not kept for monitors)."""
        for logger in trainer.loggers:
            logger.log_metrics(result.scalars(self.prefix), step=result.step)

    def publish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hand the latest probe's scalars to Lightning (not to the loggers again), so that ``EarlyStopping`` and
        ``ModelCheckpoint`` find them at every check until the next probe. Called from the hooks before checks."""
        # Every process holds the same values; syncing them keeps Lightning's DDP bookkeeping quiet and exact.
        for name, value in self.latest.items():
            pl_module.log(name, value, logger=False, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)


def run_directory(trainer: Trainer) -> Path:
    """Where a run's raw results and PNG files go: the first logger's run directory by Lightning's own rule for
    checkpoints (``ModelCheckpoint``: ``{save_dir}/{name}/{version}``), which is ``trainer.log_dir`` for TensorBoard
    and CSV loggers and, unlike ``trainer.log_dir``, a directory of each run's own for W&B and MLflow; the trainer's
    ``default_root_dir`` without loggers. Decided on rank 0 and broadcast: call it on every process."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    directory = ""  # on every other process, rank 0's, broadcast below
    if trainer.is_global_zero:
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        directory = str(Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version)
    return Path(trainer.strategy.broadcast(directory))


class RawWriter:
    """Raw results to ``{directory}/epoch=E-step=S.pt``, written to a temporary name and renamed, and each file also
    logged to the run of every MLflow logger (an artifact under ``{directory name}/``) and W&B logger (a run file,
    ``wandb.save`` with the same relative path), so that the raw results travel with those runs.

    Args:
        directory: where the files go (made when the first is written).
        loggers: the trainer's loggers (rank 0's).
    """

    def __init__(self, directory: Path, loggers: Sequence[Any] = ()) -> None:
        self.directory = Path(directory)
        self.loggers = list(loggers)

    def write(self, result: StiffnessResult) -> Path:
        """Save ``result.to_dict()``; a reader never sees half a file."""
        return self._save(result.to_dict(), raw_file_name(result.epoch, result.step))

    def write_dataset(self, result: DatasetResult) -> Path:
        """Save the whole training set's ``result.to_dict()`` to ``dataset-epoch=E-step=S.pt``, beside the probes'."""
        return self._save(result.to_dict(), dataset_raw_file_name(result.epoch, result.step))

    def _save(self, contents: dict, file_name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / file_name
        partial = target.with_name(target.name + ".tmp")
        torch.save(contents, partial)
        partial.replace(target)
        self._share(target)
        return target

    def _share(self, path: Path) -> None:
        """``path`` into the run of each MLflow and W&B logger, in its own API."""
        for logger in self.loggers:
            run: Any = logger  # of either package: typed by the checks below, not by Lightning's stubs
            if isinstance(logger, lightning_classes("loggers", "MLFlowLogger")):
                run.experiment.log_artifact(run.run_id, str(path), artifact_path=self.directory.name)
            elif isinstance(logger, lightning_classes("loggers", "WandbLogger")):
                run.experiment.save(str(path), base_path=str(self.directory.parent), policy="now")
