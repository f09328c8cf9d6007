"""Writers of a probe's result: scalars (every logger, and Lightning's monitors), images, raw files. One job each.

Each probe is its own point at its own step: scalars go to the loggers directly (as ``LearningRateMonitor`` does),
because ``pl_module.log`` would merge the probe at initialisation with the one at the end of epoch 0.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_stiffness.compat import lightning_classes
from lightning_stiffness.measure import StiffnessResult
from lightning_stiffness.names import PREFIX, probe_seconds_tag, raw_file_name
from lightning_stiffness.plots import probe_images


class ScalarWriter:
    """Scalars to every logger at the probe's step; epoch-end values also to ``pl_module.log`` for monitors.

    Args:
        prefix: the tags' first part.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix

    def write(
        self, trainer: Trainer, pl_module: LightningModule, result: StiffnessResult, seconds: float, monitor: bool
    ) -> None:
        """Log ``result``'s scalars and the probe's duration; with ``monitor``, hand the scalars to Lightning too."""
        scalars = result.scalars(self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics({**scalars, probe_seconds_tag(self.prefix): seconds}, step=result.step)
        if monitor:
            # Handed to Lightning (not to the loggers again) so that EarlyStopping and ModelCheckpoint can use them.
            # Every process holds the same values; syncing them keeps Lightning's DDP bookkeeping quiet and exact.
            for name, value in scalars.items():
                pl_module.log(name, value, logger=False, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)


class ImageWriter:
    """Images of a probe to the TensorBoard loggers (``lightning.pytorch``'s or ``pytorch_lightning``'s).

    Args:
        prefix: the tags' first part.
        every_n_probes: images of the first probe, and then of every n-th.
        warn_once: ``warn_once(key, message)``, used when no logger takes images.
    """

    def __init__(self, prefix: str, every_n_probes: int, warn_once: Callable[[str, str], None]) -> None:
        self.prefix = prefix
        self.every_n_probes = every_n_probes
        self._warn_once = warn_once

    def write(
        self, trainer: Trainer, result: StiffnessResult, class_names: Sequence[str], probe_number: int = 1
    ) -> None:
        """Render every image of ``result`` (once) and add it to each TensorBoard logger at the probe's step, when
        the probe (counted from 1) is due for images."""
        if (probe_number - 1) % self.every_n_probes:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, lightning_classes("loggers", "TensorBoardLogger"))]
        if not loggers:
            self._warn_once(
                "images",
                "StiffnessCallback: no TensorBoard logger, so images are not logged (scalars and raw results are).",
            )
            return
        images = probe_images(result, class_names, self.prefix)
        for logger in loggers:
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, global_step=result.step, dataformats="HWC")


class RawWriter:
    """Raw results to ``{directory}/epoch=E-step=S.pt``, written to a temporary name and renamed.

    Args:
        directory: where the files go (made when the first is written).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def write(self, result: StiffnessResult) -> Path:
        """Save ``result.to_dict()``; a reader never sees half a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / raw_file_name(result.epoch, result.step)
        partial = target.with_name(target.name + ".tmp")
        torch.save(result.to_dict(), partial)
        partial.replace(target)
        return target
