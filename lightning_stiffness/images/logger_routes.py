"""Finished PNG images into each logger, in its own API, costing the training thread as little as each API allows.

Lightning has no common image API (Lightning-AI/pytorch-lightning issues 4973 and 8039), so each logger class gets
its own route, found by what the logger is (the classes of both ``lightning.pytorch`` and ``pytorch_lightning``):

- TensorBoard: the PNG bytes as they are into the event file (what ``add_image`` writes, without decoding and
  encoding again);
- W&B: ``wandb.Image`` of the PNG's path (W&B copies the file into the run: no encoding again), made on a
  background thread (it decodes the file twice, which Pillow does without holding the GIL), then logged from the
  training thread at the next hook with ``WandbLogger.log_metrics``, as ``WandbLogger.log_image`` does, so that
  every call into the W&B run comes from one thread;
- MLflow: ``log_image`` on the run with the image's key and step (MLflow's image view), on the background thread:
  MLflow decodes, shrinks and encodes each image again; its client is safe to call from another thread.
"""

import functools
import io
import queue
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_stiffness.lightning_compat import lightning_classes


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's header."""
    width, height = struct.unpack(">II", png[16:24])
    return height, width


def _decoded(png: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB")


class ImageRoutes:
    """Sends PNG images to loggers; :meth:`flush` waits for those still being sent, :meth:`close` frees the rest.

    Args:
        warn: ``warn(message)`` for an image a background send could not deliver.
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._setup(warn)

    def _setup(self, warn: Callable[[str], None]) -> None:
        """The settings, and no thread or files yet."""
        self._warn = warn
        self._files: Path | None = None
        self._outbox: queue.Queue | None = None
        self._sending = 0
        self._routes: list[tuple[tuple[type, ...], Callable[[Any, str, bytes, int], None]]] | None = None
        self._ready: list[tuple[Any, str, Any, int]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Only the settings: a copy (``ddp_spawn`` pickles the callbacks) starts its own thread and files."""
        return {"warn": self._warn}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["warn"])

    def route(self, logger: Any) -> Callable[[str, bytes, int], None] | None:
        """How ``logger`` takes an image, ``send(tag, png, step)``; ``None`` for a logger without images (the caller
        writes files)."""
        if self._routes is None:  # found once: looking for the standalone package's classes imports modules
            self._routes = [
                (lightning_classes("loggers", "TensorBoardLogger"), self._tensorboard),
                (lightning_classes("loggers", "WandbLogger"), self._wandb),
                (lightning_classes("loggers", "MLFlowLogger"), self._mlflow),
            ]
        send = next((send for classes, send in self._routes if isinstance(logger, classes)), None)
        return None if send is None else functools.partial(send, logger)

    def flush(self, timeout: float) -> bool:
        """Wait until the background thread has done every job (then :meth:`log_ready` logs the W&B images);
        ``True`` if all were done in time."""
        deadline = time.monotonic() + timeout
        while self._pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._pending()

    def close(self) -> None:
        """Stop the background sender after what it holds, and remove the files handed to W&B (it has copied them)."""
        if self._outbox is not None:
            self._outbox.put(None)
            self._outbox = None
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)
            self._files = None

    # ------------------------------------------------------------------------------------------------ the routes

    @staticmethod
    def _tensorboard(logger: Any, tag: str, png: bytes, step: int) -> None:
        writer = logger.experiment
        if not hasattr(writer, "_get_file_writer"):  # another writer class: decode and let it encode again
            writer.add_image(tag, _decoded(png), global_step=step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = _png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def _wandb(self, logger: Any, tag: str, png: bytes, step: int) -> None:
        if self._files is None:
            self._files = Path(tempfile.mkdtemp(prefix="stiffness-images-"))
        path = self._files / f"{tag.replace('/', '~')}-step={step}.png"
        path.write_bytes(png)

        def prepare() -> None:  # wandb.Image decodes the file (twice); Pillow decodes without the GIL
            import wandb

            image = wandb.Image(str(path))
            with self._lock:
                self._ready.append((logger, tag, image, step))

        self._background(prepare, f"W&B did not take the image {tag} of step {step}")

    def _mlflow(self, logger: Any, tag: str, png: bytes, step: int) -> None:
        client, run_id = logger.experiment, logger.run_id

        def send() -> None:  # MLflow's client is thread-safe; it decodes, shrinks and encodes the image again
            # A step series per tag in MLflow's image view (mlflow >= 2.12); "/" is kept in the key.
            client.log_image(run_id, _decoded(png), key=tag, step=step, synchronous=True)

        self._background(send, f"MLflow did not take the image {tag} of step {step}")

    def log_ready(self) -> None:
        """Log the W&B images prepared in the background, from this (the training) thread, where W&B's other
        records come from: ``WandbLogger.log_metrics`` with ``wandb.Image`` values, as ``log_image`` does."""
        with self._lock:
            ready, self._ready = self._ready, []
        batches: dict[tuple[int, int], tuple[Any, dict[str, list]]] = {}
        for logger, tag, image, step in ready:
            batches.setdefault((id(logger), step), (logger, {}))[1][tag] = [image]
        for (_, step), (logger, images) in batches.items():
            logger.log_metrics(images, step=step)

    # ---------------------------------------------------------------------------------------- the background thread

    def _background(self, job: Callable[[], None], failure: str) -> None:
        if self._outbox is None:
            self._outbox = queue.Queue()
            worker = threading.Thread(target=self._work, args=(self._outbox,), daemon=True, name="stiffness-images")
            worker.start()
        with self._lock:
            self._sending += 1
        self._outbox.put((job, failure))

    def _work(self, outbox: queue.Queue) -> None:
        while (item := outbox.get()) is not None:
            job, failure = item
            try:
                job()
            except Exception as err:  # reported, never raised into training
                self._warn(f"{failure}: {type(err).__name__}: {err}")
            finally:
                with self._lock:
                    self._sending -= 1

    def _pending(self) -> int:
        with self._lock:
            return self._sending
