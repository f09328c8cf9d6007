"""Writers of a probe's result: scalars (every logger, and Lightning's monitors), images (every logger, in its own
API), raw files. One job each.

Each probe is its own point at its own step: scalars go to the loggers directly (as ``LearningRateMonitor`` does),
because ``pl_module.log`` would merge the probe at initialisation with the one at the end of epoch 0. Monitors get
the latest probe's values at every check (:meth:`ScalarWriter.publish`), so they find them until the next probe.
"""

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_stiffness.image_routes import ImageRoutes
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import PREFIX, image_file, probe_label, probe_seconds_tag, raw_file_name
from lightning_stiffness.plots import probe_specs
from lightning_stiffness.rendering import Renderer

#: How long the end of training waits for images still being drawn.
FLUSH_TIMEOUT_S = 300.0


class ScalarWriter:
    """Scalars to every logger at the probe's step; the latest probe's values to ``pl_module.log`` for monitors.

    Args:
        prefix: the tags' first part.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.latest: dict[str, float] = {}

    def write(self, trainer: Trainer, result: StiffnessResult, seconds: float) -> None:
        """Log ``result``'s scalars and the probe's duration, and keep them for :meth:`publish`."""
        scalars = result.scalars(self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics({**scalars, probe_seconds_tag(self.prefix): seconds}, step=result.step)
        self.latest = scalars

    def publish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hand the latest probe's scalars to Lightning (not to the loggers again), so that ``EarlyStopping`` and
        ``ModelCheckpoint`` find them at every check until the next probe. Called from the hooks before checks."""
        # Every process holds the same values; syncing them keeps Lightning's DDP bookkeeping quiet and exact.
        for name, value in self.latest.items():
            pl_module.log(name, value, logger=False, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)


class ImageWriter:
    """A probe's images, drawn off the training process and handed to every logger at a later hook.

    TensorBoard (either package) gets each PNG in its event file, W&B through ``WandbLogger.log_image``, MLflow
    through ``log_image`` on the run (:mod:`~lightning_stiffness.image_routes`); when some logger takes no images
    (CSV, ...), PNG files are written to ``{log_dir}/{tag}/epoch=E-step=S.png``, beside the raw results.

    Args:
        prefix: the tags' first part.
        every_n_probes: images of the first probe, of every n-th, and always of the last (at :meth:`finish`).
        warn: ``warn(message)`` for images that could not be drawn or written.
        background: draw in a worker process (see :mod:`~lightning_stiffness.rendering`).
    """

    def __init__(self, prefix: str, every_n_probes: int, warn: Callable[[str], None], background: bool = True) -> None:
        self.prefix = prefix
        self.every_n_probes = every_n_probes
        self._warn = warn
        # A partial, not a lambda: the callback (and this writer) must pickle for `ddp_spawn`.
        self._renderer = Renderer(background, warn=functools.partial(_prefixed, warn))
        self._routes = ImageRoutes(warn=functools.partial(_prefixed, warn))
        self._held: tuple[dict[str, Any], tuple[int, int]] | None = None
        #: The logger's ``log_dir``, where PNG files go; set when training starts (asking the trainer for it is a
        #: collective call under DDP, which rank 0 alone must not make).
        self.directory: Path | None = None

    def start(self) -> None:
        """Start the render worker ahead of the first probe (while Lightning sets up, a core is often idle)."""
        self._renderer.start()

    def write(
        self, trainer: Trainer, result: StiffnessResult, class_names: Sequence[str], probe_number: int = 1
    ) -> None:
        """Send ``result``'s figures to be drawn when the probe (counted from 1) is due for images; otherwise keep
        them, in case this probe turns out to be the last."""
        specs = probe_specs(result, class_names, self.prefix)
        if (probe_number - 1) % self.every_n_probes:
            self._held = (specs, (result.epoch, result.step))
            return
        self._held = None
        self._renderer.submit(specs, (result.epoch, result.step))

    def write_specs(self, specs: dict[str, Any], epoch: int, step: int) -> None:
        """Send figures that are not a probe's (the whole training set's class matrix) to be drawn now."""
        self._renderer.submit(specs, (epoch, step))

    def deliver(self, trainer: Trainer) -> None:
        """Hand the images finished so far to the loggers (cheap when there are none)."""
        for (epoch, step), answer in self._renderer.finished():
            if isinstance(answer, str):
                self._warn(f"StiffnessCallback: the images of the probe at {probe_label(epoch, step)} failed: {answer}")
                continue
            self._hand_out(trainer, answer, epoch, step)
        self._guarded(self._routes.log_ready, "earlier probes")  # W&B images prepared in the background

    def _guarded(self, write: Callable[[], None], probes: str, where: str = "") -> None:
        """Run ``write``; a broken logger or a full disk must not stop training, nor keep the others' images."""
        try:
            write()
        except Exception as err:
            self._warn(f"StiffnessCallback: writing the images of {probes}{where} failed: {type(err).__name__}: {err}")

    def finish(self, trainer: Trainer) -> None:
        """Draw the last probe if it was not drawn, wait for every image, hand them all out, stop the worker."""
        if self._held is not None:
            self._renderer.submit(*self._held)
            self._held = None
        if not self._renderer.wait(FLUSH_TIMEOUT_S):
            self._warn(f"StiffnessCallback: images still being drawn after {FLUSH_TIMEOUT_S:.0f} s are left out.")
        self.deliver(trainer)
        self._renderer.close()
        sent = self._routes.flush(FLUSH_TIMEOUT_S)
        self._guarded(self._routes.log_ready, "the last probes")
        if not sent:
            self._warn(f"StiffnessCallback: images still being sent after {FLUSH_TIMEOUT_S:.0f} s are left out.")
        self._routes.close()

    def close(self) -> None:
        """Stop the worker and the sending thread without waiting (a fit that ended before training started)."""
        self._held = None
        self._renderer.close()
        self._routes.close()

    def _hand_out(self, trainer: Trainer, pngs: dict[str, bytes], epoch: int, step: int) -> None:
        """Each logger its images (one logger's failure costs the others nothing); PNG files when some logger
        takes no images."""
        probe = probe_label(epoch, step)
        without_images = False
        for logger in trainer.loggers:
            send = self._routes.route(logger)
            if send is None:
                without_images = True
                continue
            self._guarded(functools.partial(_send_all, send, pngs, step), probe, f" to {type(logger).__name__}")
        if without_images and self.directory is not None:
            self._guarded(functools.partial(self._write_files, pngs, epoch, step), probe, f" to {self.directory}")

    def _write_files(self, pngs: dict[str, bytes], epoch: int, step: int) -> None:
        for tag, png in pngs.items():
            path = self.directory / image_file(tag, epoch, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)


def run_directory(trainer: Trainer) -> Path:
    """Where a run's raw results and PNG files go: the first logger's run directory by Lightning's own rule for
    checkpoints (``ModelCheckpoint``: ``{save_dir}/{name}/{version}``), which is ``trainer.log_dir`` for TensorBoard
    and CSV loggers and, unlike ``trainer.log_dir``, a directory of each run's own for W&B and MLflow; the trainer's
    ``default_root_dir`` without loggers. Decided on rank 0 and broadcast: call it on every process."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    directory = None
    if trainer.is_global_zero:
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        directory = str(Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version)
    return Path(trainer.strategy.broadcast(directory))


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


def _send_all(send: Callable[[str, bytes, int], None], pngs: dict[str, bytes], step: int) -> None:
    for tag, png in pngs.items():
        send(tag, png, step)


def _prefixed(warn: Callable[[str], None], message: str) -> None:
    warn(f"StiffnessCallback: {message}")
