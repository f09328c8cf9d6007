"""The callback's image writer: each probe's figures drawn off the training process, the PNGs handed to the loggers.

:class:`ImageWriter` turns a result into figure specs (:mod:`~lightning_stiffness.images.specs`), has them drawn by
the render worker (:mod:`~lightning_stiffness.images.render_worker`) and hands the PNGs to each logger in its own API
(:mod:`~lightning_stiffness.images.logger_routes`), or writes PNG files for loggers that take no images.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Trainer

from lightning_stiffness.images.logger_routes import ImageRoutes
from lightning_stiffness.images.render_worker import Renderer
from lightning_stiffness.images.specs import ImageSpec, probe_specs
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import image_file, probe_label

#: How long the end of training waits for images still being drawn.
FLUSH_TIMEOUT_S = 300.0


class ImageWriter:
    """A probe's images, drawn off the training process and handed to every logger at a later hook.

    TensorBoard (either package) gets each PNG in its event file, W&B through ``WandbLogger.log_image``, MLflow
    through ``log_image`` on the run (:mod:`~lightning_stiffness.images.logger_routes`); when some logger takes no
    images (CSV, ...), PNG files are written to ``{log_dir}/{tag}/epoch=E-step=S.png``, beside the raw results.

    Args:
        prefix: the tags' first part.
        every_n_probes: images of the first probe, of every n-th, and always of the last (at :meth:`finish`).
        warn: ``warn(message)`` for images that could not be drawn or written.
        background: draw in a worker process (see :mod:`~lightning_stiffness.images.render_worker`).
    """

    def __init__(self, prefix: str, every_n_probes: int, warn: Callable[[str], None], background: bool = True) -> None:
        self.prefix = prefix
        self.every_n_probes = every_n_probes
        self._warn = warn
        # A partial, not a lambda: the callback (and this writer) must pickle for `ddp_spawn`.
        self._renderer = Renderer(background, warn=functools.partial(_prefixed, warn))
        self._routes = ImageRoutes(warn=functools.partial(_prefixed, warn))
        self._held: tuple[dict[str, ImageSpec], tuple[int, int]] | None = None
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

    def write_specs(self, specs: Mapping[str, ImageSpec], epoch: int, step: int) -> None:
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
            write = functools.partial(_write_files, self.directory, pngs, epoch, step)
            self._guarded(write, probe, f" to {self.directory}")


def _write_files(directory: Path, pngs: dict[str, bytes], epoch: int, step: int) -> None:
    """The PNG files of one probe under ``directory`` (the logger's ``log_dir``)."""
    for tag, png in pngs.items():
        path = directory / image_file(tag, epoch, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)


def _send_all(send: Callable[[str, bytes, int], None], pngs: dict[str, bytes], step: int) -> None:
    for tag, png in pngs.items():
        send(tag, png, step)


def _prefixed(warn: Callable[[str], None], message: str) -> None:
    warn(f"StiffnessCallback: {message}")
