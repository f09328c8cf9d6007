r"""

Stiffness Callback
==================

Measures gradient stiffness (Fort et al., arXiv 1901.09491) on fixed probe examples while a model trains, and logs
class stiffness matrices, within/between-class stiffness and stiffness-against-distance curves.

"""

import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from tqdm import tqdm
from typing_extensions import override

from lightning_stiffness.distributed import (
    AgreedFailure,
    agree_on_failure,
    all_norms,
    gather_rows,
    row_span,
    term_gatherer,
)
from lightning_stiffness.gram import METHODS, gradient_gram
from lightning_stiffness.gram.validation import default_loss_fn
from lightning_stiffness.measure import KINDS, GramRows, StiffnessResult, measure_stiffness
from lightning_stiffness.plots import probe_images
from lightning_stiffness.probe import (
    ProbeDataError,
    ProbeSet,
    dataset_labels,
    gather,
    resolve_callable,
    stratified_indices,
)
from lightning_stiffness.representations import check_layer_names, forward_with_outputs

_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")


class ProbeSkipped(RuntimeError):
    """A probe that cannot give a meaningful answer (for example, a non-finite loss on a probe example)."""


class StiffnessCallback(Callback):
    r"""Measure gradient stiffness on fixed probe examples at chosen epochs and log it.

    For probe examples i, j with per-example loss gradients :math:`g_i, g_j`, cosine stiffness is
    :math:`\cos(g_i, g_j)` and sign stiffness :math:`\operatorname{sign}(g_i \cdot g_j)`: positive when a gradient
    step on i also lowers the loss on j. Each probe logs, for the pairs ``train-train``, ``train-val`` and ``val-val``:

    - scalars ``stiffness/{pair}/{kind}/within_class``, ``stiffness/{pair}/{kind}/between_class`` and
      ``stiffness/{pair}/critical_distance/input`` (each probe its own point at the trainer's global step; the values
      of epoch-end probes are also given to ``pl_module.log`` so ``EarlyStopping`` / ``ModelCheckpoint`` can monitor
      them);
    - TensorBoard images ``stiffness/{pair}/{kind}/class_matrix`` and ``stiffness/{pair}/distance_curve``;
    - raw results ``stiffness/epoch=E-step=S.pt`` under the trainer's ``log_dir``.

    The probe calls ``pl_module(x)`` in eval mode and differentiates ``loss_fn(outputs, y)`` per example; the model's
    modes, parameters, gradients and every random number generator are restored afterwards, so training follows
    exactly the trajectory it would without the callback.

    Args:
        samples_per_class: probe examples drawn per class from the training set and from the validation set.
        epochs: epochs (0-based) at whose end to probe. Cannot be combined with ``every_n_epochs``.
        every_n_epochs: probe at the end of every n-th epoch; 0 for no epoch-end probes. Default: every epoch,
            unless ``epochs`` is given.
        probe_at_start: probe once when training starts, before the first optimiser step (epoch 0, step 0).
        kinds: stiffness kinds to measure, among ``"cosine"`` and ``"sign"``. Default: both.
        method: Gram engine, see :func:`lightning_stiffness.functional.gradient_gram`.
        chunk_size: examples per block of per-example gradients (bounds memory); default from a memory budget.
        seed: seed of the callback's own generator, which draws the probe examples.
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> [N]``, a callable or an import path
            ``"package.module.function"``. Default: cross-entropy with ``reduction="none"``.
        batch_to_xy: turns a dataset item into ``(x, y)``, a callable or an import path. Default: the first two
            entries of a tuple or list, or a dict's ``x``/``input``/``inputs``/``image``/``images``/``features``/
            ``input_ids`` and ``y``/``label``/``labels``/``target``/``targets`` keys.
        num_distance_bins: bins of the stiffness-against-distance curves.
        save_raw: write each probe's raw results to ``{log_dir}/stiffness/epoch=E-step=S.pt``.
        log_images: log class-matrix and distance-curve images (TensorBoard loggers only).
        images_every_n_probes: render images at every n-th probe only (rendering costs about 0.2 s an image).
        class_names: names for the class axes; default: the training dataset's ``classes`` attribute, or the labels.
        per_layer: also measure each layer's own gradients: scalars
            ``stiffness/{pair}/{kind}/by_layer/{layer}/within_class`` (and ``between_class``) and an image
            ``stiffness/{pair}/by_layer`` of within/between cosine stiffness per layer.
        layers: module names (as in ``pl_module.named_modules()``) whose outputs give representation-space
            distances: stiffness-against-distance curves and the critical distance for each, scalars
            ``stiffness/{pair}/critical_distance/{layer}``, images ``stiffness/{pair}/distance_curve/{layer}`` and
            ``stiffness/{pair}/critical_distance_by_layer``.
        layer_distance: metric of the representation distances: ``"cosine"`` (1 - cos) or ``"euclidean"``.

    Raises:
        MisconfigurationException:
            In ``__init__`` for an argument out of range (``samples_per_class < 2``, an empty ``epochs``, a negative
            ``every_n_epochs``, an unknown kind or method, ...). At setup when there is no logger or the strategy
            shards the model (FSDP, DeepSpeed); when training starts if the training data has no integer class
            labels.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_stiffness import StiffnessCallback
        >>> stiffness = StiffnessCallback(samples_per_class=20, epochs=[0, 1, 4, 9])
        >>> trainer = Trainer(callbacks=[stiffness], max_epochs=10)
    """

    def __init__(
        self,
        samples_per_class: int = 10,
        epochs: list[int] | None = None,
        every_n_epochs: int | None = None,
        probe_at_start: bool = True,
        kinds: list[Literal["cosine", "sign"]] | None = None,
        method: Literal["auto", "factored", "torch.func"] = "auto",
        chunk_size: int | None = None,
        seed: int = 0,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | str | None = None,
        batch_to_xy: Callable[[Any], tuple[Any, Any]] | str | None = None,
        num_distance_bins: int = 20,
        save_raw: bool = True,
        log_images: bool = True,
        images_every_n_probes: int = 1,
        class_names: list[str] | None = None,
        per_layer: bool = False,
        layers: list[str] | None = None,
        layer_distance: Literal["cosine", "euclidean"] = "cosine",
    ) -> None:
        _check_int(samples_per_class, "samples_per_class", minimum=2)
        if epochs is not None:
            if not isinstance(epochs, (list, tuple)) or len(epochs) == 0:
                raise MisconfigurationException(f"`epochs` must be a non-empty list of epoch numbers, got {epochs!r}.")
            for epoch in epochs:
                _check_int(epoch, "epochs", minimum=0)
            if every_n_epochs is not None:
                raise MisconfigurationException("Give either `epochs` or `every_n_epochs`, not both.")
        if every_n_epochs is not None:
            _check_int(every_n_epochs, "every_n_epochs", minimum=0)
        kinds = list(KINDS) if kinds is None else list(kinds)
        if not kinds or any(kind not in KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
            raise MisconfigurationException(f"`kinds` must be distinct values among {list(KINDS)}, got {kinds!r}.")
        if method not in METHODS:
            raise MisconfigurationException(f"`method` must be one of {list(METHODS)}, got {method!r}.")
        if chunk_size is not None:
            _check_int(chunk_size, "chunk_size", minimum=1)
        _check_int(seed, "seed", minimum=0)
        _check_int(num_distance_bins, "num_distance_bins", minimum=1)
        _check_int(images_every_n_probes, "images_every_n_probes", minimum=1)
        try:
            self._loss_fn = resolve_callable(loss_fn, "loss_fn") or default_loss_fn
            self._batch_to_xy = resolve_callable(batch_to_xy, "batch_to_xy")
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if class_names is not None and not all(isinstance(name, str) for name in class_names):
            raise MisconfigurationException(f"`class_names` must be a list of strings, got {class_names!r}.")

        self.samples_per_class = samples_per_class
        self.epochs = sorted(set(epochs)) if epochs is not None else None
        self.every_n_epochs = every_n_epochs if (every_n_epochs is not None or epochs is not None) else 1
        self.probe_at_start = probe_at_start
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.method = method
        self.chunk_size = chunk_size
        self.seed = seed
        self.num_distance_bins = num_distance_bins
        self.save_raw = save_raw
        self.log_images = log_images
        self.images_every_n_probes = images_every_n_probes
        self.class_names = class_names
        self.per_layer = per_layer
        if layers is not None and (not isinstance(layers, (list, tuple)) or not layers):
            raise MisconfigurationException(f"`layers` must be a non-empty list of module names, got {layers!r}.")
        if layer_distance not in ("cosine", "euclidean"):
            raise MisconfigurationException(
                f"`layer_distance` must be 'cosine' or 'euclidean', got {layer_distance!r}."
            )
        self.layers = list(layers) if layers is not None else []
        self.layer_distance = layer_distance

        self._idle = False
        self._probe_sets: dict[str, ProbeSet] = {}
        self._restored_indices: dict[str, Tensor] = {}
        self._num_classes = 0
        self._probes_done = 0
        self._warned: set[str] = set()
        self._raw_dir = Path("stiffness")
        #: The most recent probe's result on this process (``None`` before the first probe).
        self.last_result: StiffnessResult | None = None

    # ----------------------------------------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._idle = False
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _SHARDED_STRATEGIES):
            raise MisconfigurationException(
                f"StiffnessCallback does not support the sharded strategy {strategy}: each process holds only part of "
                "the parameters, so per-example gradients over all of them cannot be formed. Use a single device or "
                "`strategy='ddp'`."
            )
        if trainer.fast_dev_run:
            self._idle = True
            rank_zero_info("StiffnessCallback: idle under `fast_dev_run` (no probes, nothing logged).")
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "StiffnessCallback needs a logger to write its scalars and images; the Trainer has none "
                "(`logger=False`). Pass `logger=True` or a logger such as TensorBoardLogger."
            )
        if self.layers:
            try:
                self.layers = check_layer_names(pl_module, self.layers)
            except ValueError as err:
                raise MisconfigurationException(f"StiffnessCallback: {err}") from err

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._idle:
            return
        # `trainer.log_dir` is a collective call under DDP: ask for it here, on every process, not on rank 0 alone.
        self._raw_dir = Path(trainer.log_dir or trainer.default_root_dir) / "stiffness"
        with _preserved_rng(pl_module.device):
            self._build_probe_sets(trainer)
        if self.probe_at_start and trainer.global_step == 0:
            self._probe(trainer, pl_module, at_start=True)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._idle or not self._probe_sets or not self._scheduled(trainer.current_epoch):
            return
        self._probe(trainer, pl_module, at_start=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "samples_per_class": self.samples_per_class,
            "indices": {name: probe.indices.clone() for name, probe in self._probe_sets.items()},
            "probes_done": self._probes_done,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_indices = {name: torch.as_tensor(idx) for name, idx in state_dict.get("indices", {}).items()}
        self._probes_done = int(state_dict.get("probes_done", 0))

    # ------------------------------------------------------------------------------------------------------- probe sets

    def _scheduled(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0

    def _build_probe_sets(self, trainer: Trainer) -> None:
        datasets = {"train": _first_dataset(trainer.train_dataloader, "training", self._warn_once)}
        if trainer.val_dataloaders is not None and trainer.limit_val_batches != 0:
            val = _first_dataset(trainer.val_dataloaders, "validation", self._warn_once)
            if val is not None:
                datasets["val"] = val
        if datasets["train"] is None:
            raise MisconfigurationException("StiffnessCallback could not find the training dataset.")
        generator = torch.Generator().manual_seed(self.seed)
        self._probe_sets = {}
        for name, dataset in datasets.items():
            where = f"the {'training' if name == 'train' else 'validation'} dataset"
            try:
                if name in self._restored_indices:
                    indices = self._restored_indices[name]
                    if len(indices) and int(indices.max()) >= len(dataset):
                        raise ProbeDataError(
                            f"{where} has {len(dataset)} items, fewer than the checkpoint's probe indices need."
                        )
                else:
                    labels = dataset_labels(dataset, self._batch_to_xy, where)
                    if labels.numel() == 0:
                        raise ProbeDataError(f"{where} is empty.")
                    if int(labels.min()) < 0:
                        raise ProbeDataError(f"{where} has negative labels; class labels must be 0, 1, 2, ...")
                    indices, short = stratified_indices(labels, self.samples_per_class, generator)
                    # Drawn on every process with the same seed; rank 0's draw is the one all of them probe.
                    indices = trainer.strategy.broadcast(indices, src=0)
                    if short:
                        rank_zero_warn(
                            f"StiffnessCallback: in {where}, some classes have fewer than {self.samples_per_class} "
                            f"examples and are probed with all they have: {short} (class: count)."
                        )
                self._probe_sets[name] = gather(dataset, indices, self._batch_to_xy, where)
            except ProbeDataError as err:
                raise MisconfigurationException(f"StiffnessCallback: {err}") from err
        self._num_classes = max(int(p.labels.max()) + 1 for p in self._probe_sets.values())
        if self.class_names is None:
            names = getattr(datasets["train"], "classes", None)
            if isinstance(names, (list, tuple)) and len(names) >= self._num_classes:
                self.class_names = [str(n) for n in names]
        if self.class_names is not None and len(self.class_names) < self._num_classes:
            raise MisconfigurationException(
                f"`class_names` names {len(self.class_names)} classes but the labels go up to {self._num_classes - 1}."
            )
        sizes = ", ".join(f"{len(p)} {name}" for name, p in self._probe_sets.items())
        rank_zero_info(f"StiffnessCallback: probing {sizes} examples over {self._num_classes} classes.")

    # ----------------------------------------------------------------------------------------------------------- probe

    def _probe(self, trainer: Trainer, pl_module: LightningModule, at_start: bool) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        started = time.perf_counter()
        try:
            with _preserved_rng(pl_module.device), _eval_mode(pl_module), torch.inference_mode(False):
                with torch.enable_grad(), _progress_bar(trainer, f"Stiffness probe (epoch {epoch})") as progress:
                    result = self._measure(trainer, pl_module, epoch, step, progress)
        except Exception as err:  # a failed probe must never stop training: it is reported and skipped
            rank_zero_warn(
                f"StiffnessCallback: the probe at epoch {epoch} (step {step}) was skipped: {type(err).__name__}: {err}"
            )
            return
        seconds = time.perf_counter() - started
        self.last_result = result
        self._probes_done += 1
        self._log_scalars(trainer, pl_module, result, seconds, at_start)
        written = time.perf_counter()
        if trainer.is_global_zero:
            try:
                if self.log_images and (self._probes_done - 1) % self.images_every_n_probes == 0:
                    self._log_images(trainer, result)
                if self.save_raw:
                    self._save_raw(trainer, result)
            except Exception as err:  # a full disk or a broken logger must not stop training either
                rank_zero_warn(
                    f"StiffnessCallback: writing the images or raw results of the probe at epoch {epoch} "
                    f"(step {step}) failed: {type(err).__name__}: {err}"
                )
        rank_zero_info(
            f"StiffnessCallback: probe at epoch {epoch} (step {step}) took {seconds:.2f} s "
            f"(+ {time.perf_counter() - written:.2f} s writing images and raw results)."
        )

    def _measure(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        epoch: int,
        step: int,
        progress: Callable[[int, int], None] | None,
    ) -> StiffnessResult:
        world, strategy = trainer.world_size, trainer.strategy
        device = pl_module.device
        inputs = {name: p.inputs.to(device) for name, p in self._probe_sets.items()}
        labels = {name: p.labels.to(device) for name, p in self._probe_sets.items()}
        all_x = torch.cat(list(inputs.values()))
        all_y = torch.cat(list(labels.values()))
        total = len(all_y)
        span = row_span(total, world, trainer.global_rank)
        # Under DDP every failure must be agreed on by all processes before the next collective call, so that none
        # is left waiting: once after the checks below, once for the Gram phase (see `term_gatherer`).
        error = None
        try:
            # One forward without gradients checks the losses and records the representations of `layers`.
            outputs, representations = forward_with_outputs(pl_module, all_x, self.layers, self.chunk_size or 512)
            with torch.no_grad():
                losses = self._loss_fn(outputs, all_y)
            bad = int((~torch.isfinite(losses)).sum())
            if bad:
                raise ProbeSkipped(f"the loss is not finite for {bad} of {total} probe examples")
        except Exception as err:
            error = err
        error = agree_on_failure(strategy, world, error)
        if error is not None:
            raise error
        try:
            grams = self._gram_rows(trainer, pl_module, all_x, all_y, span, world, progress)
        except AgreedFailure as agreed:
            raise agreed.cause from None
        except Exception as err:
            error = err
        error = agree_on_failure(strategy, world, error)
        if error is not None:
            raise error

        rows = torch.arange(span.start, span.stop, device=device)
        parts = {key: GramRows(g, rows, all_norms(strategy, world, g, span, total)) for key, g in grams.items()}
        whole = parts.pop("")
        full = gather_rows(strategy, world, whole.values, total) if self.save_raw else None
        return measure_stiffness(
            whole,
            inputs,
            labels,
            {name: p.indices for name, p in self._probe_sets.items()},
            kinds=self.kinds,
            num_classes=self._num_classes,
            num_distance_bins=self.num_distance_bins,
            epoch=epoch,
            step=step,
            layer_grams=parts or None,
            representations=_split_by_set(representations, inputs) if self.layers else None,
            distance_metric=self.layer_distance,
            full_gram=full,
            sync=world > 1,
        )

    def _gram_rows(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        all_x: Tensor,
        all_y: Tensor,
        span: slice,
        world: int,
        progress: Callable[[int, int], None] | None,
    ) -> dict[str, Tensor]:
        """This process's rows of the Gram matrix (key ``""``) and, with ``per_layer``, of each layer's."""
        options = {
            "loss_fn": self._loss_fn,
            "method": self.method,
            "chunk_size": self.chunk_size,
            "per_layer": self.per_layer,
            "progress": progress,
        }
        if world == 1:
            grams = gradient_gram(pl_module, all_x, all_y, **options)
        else:
            if self.method != "torch.func":
                options["gather_columns"] = term_gatherer(trainer.strategy, world, len(all_y))
            # More processes than probe examples: an empty share still takes part in the gathers, with one row
            # that is dropped.
            rows = span if span.stop > span.start else slice(0, 1)
            grams = gradient_gram(pl_module, all_x[rows], all_y[rows], all_x, all_y, **options)
            if span.stop == span.start:
                grams = {k: g[:0] for k, g in grams.items()} if self.per_layer else grams[:0]
        if not self.per_layer:
            return {"": grams}
        return {"": sum(grams.values()), **grams}

    # --------------------------------------------------------------------------------------------------------- outputs

    def _log_scalars(
        self, trainer: Trainer, pl_module: LightningModule, result: StiffnessResult, seconds: float, at_start: bool
    ) -> None:
        scalars = result.scalars()
        # Each probe is its own point at its own step, so write to the loggers directly (as LearningRateMonitor does):
        # `pl_module.log` would merge the probe at initialisation with the one at the end of epoch 0.
        for logger in trainer.loggers:
            logger.log_metrics({**scalars, "stiffness/probe_seconds": seconds}, step=result.step)
        if not at_start:
            # Also hand epoch-end values to Lightning (not to the loggers again) so that monitors can use them.
            for name, value in scalars.items():
                # Every process holds the same values; syncing them keeps Lightning's DDP bookkeeping quiet and exact.
                pl_module.log(name, value, logger=False, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    def _log_images(self, trainer: Trainer, result: StiffnessResult) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            self._warn_once(
                "images",
                "StiffnessCallback: no TensorBoard logger, so images are not logged (scalars and raw results are).",
            )
            return
        names = (self.class_names or [str(c) for c in range(result.num_classes)])[: result.num_classes]
        images = probe_images(result, names)
        for logger in loggers:
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, global_step=result.step, dataformats="HWC")

    def _save_raw(self, trainer: Trainer, result: StiffnessResult) -> None:
        directory = self._raw_dir
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"epoch={result.epoch}-step={result.step}.pt"
        partial = target.with_name(target.name + ".tmp")
        torch.save(result.to_dict(), partial)
        partial.replace(target)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _first_dataset(loaders: Any, what: str, warn_once: Callable[[str, str], None]) -> Any:
    """The dataset of the (first) dataloader in ``loaders``, which may be a loader or a collection of them."""
    found = []

    def visit(node: Any) -> None:
        if hasattr(node, "dataset"):
            found.append(node.dataset)
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(loaders)
    if len(found) > 1:
        warn_once(what, f"StiffnessCallback: several {what} dataloaders; probing the first one's dataset.")
    return found[0] if found else None


def _split_by_set(representations: dict[str, Tensor], inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Layer -> outputs of all probe examples, into probe set -> layer -> that set's rows."""
    out, start = {}, 0
    for name, x in inputs.items():
        out[name] = {layer: rows[start : start + x.shape[0]] for layer, rows in representations.items()}
        start += x.shape[0]
    return out


@contextmanager
def _progress_bar(trainer: Trainer, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A transient tqdm bar for the Gram computation, where the trainer shows a progress bar (rank 0 only)."""
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        yield None
        return
    bar = tqdm(desc=description, leave=False, dynamic_ncols=True, file=sys.stderr, unit="block")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own mode (not just the top module's)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore torch's (CPU and the model's CUDA device), Python's and NumPy's random states afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
