r"""

Stiffness Callback
==================

Measures gradient stiffness (Fort et al., arXiv 1901.09491) on fixed probe examples while a model trains, and logs
class stiffness matrices, within/between-class stiffness and stiffness-against-distance curves.

The callback is Lightning glue: it validates its arguments, keeps the schedule and the probe examples (its state),
and delegates the rest: probe sets to :mod:`~lightning_stiffness.callback.probe_sets`, measuring to
:mod:`~lightning_stiffness.callback.probing`, writing to :mod:`~lightning_stiffness.callback.writers` and
:mod:`~lightning_stiffness.images.image_writer`.

"""

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stiffness.callback.distributed import Communicator
from lightning_stiffness.callback.extra_measures import DEFAULT_NUM_BOOTSTRAP, ClassGroups, ExtraMeasures
from lightning_stiffness.callback.isolation import eval_mode, preserved_rng
from lightning_stiffness.callback.probe_sets import (
    SET_WORDS,
    ProbeSets,
    build_probe_sets,
    find_collate_fn,
    find_datasets,
)
from lightning_stiffness.callback.probing import ProbeOptions, measure_probe
from lightning_stiffness.callback.progress import progress_bar
from lightning_stiffness.callback.schedule import ProbeSchedule
from lightning_stiffness.callback.writers import RawWriter, ScalarWriter, run_directory
from lightning_stiffness.exceptions import is_expected, strict_default
from lightning_stiffness.gram import METHODS
from lightning_stiffness.gram.validation import check_choice, check_int, default_loss_fn
from lightning_stiffness.images.image_writer import ImageWriter
from lightning_stiffness.lightning_compat import lightning_classes
from lightning_stiffness.measures.representations import check_layer_names
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import DISTANCE_METRICS, KINDS, PREFIX, probe_label

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class StiffnessCallback(Callback):
    r"""Measure gradient stiffness on fixed probe examples at chosen epochs or steps and log it.

    Stiffness between examples i, j is :math:`\cos(g_i, g_j)` or :math:`\operatorname{sign}(g_i \cdot g_j)` of their
    loss gradients. Each probe logs scalars (``stiffness/{pair}/{kind}/within_class``, ...) and images to every logger
    at the global step, raw results under ``log_dir``, and keeps the latest scalars available to monitors. Training
    is unchanged (modes, parameters, gradients and random states are restored after each probe).

    Args:
        samples_per_class: probe examples drawn per class from the training set and from the validation set.
        epochs: epochs (Lightning's, 0-based) at whose end to probe. Cannot be combined with ``every_n_epochs``.
        every_n_epochs: probe at the end of every n-th epoch; 0 for none. Default: 1, unless ``epochs``, ``steps``
            or ``every_n_steps`` is given.
        steps: global steps (optimiser steps taken, >= 1) after which to probe, alone or with an epoch schedule.
        every_n_steps: probe after every n-th optimiser step. A step is never probed twice.
        probe_at_start: probe once when training starts, before the first optimiser step ("initialisation").
        kinds: stiffness kinds to measure, among ``"cosine"`` and ``"sign"``. Default: both.
        method: Gram engine, see :func:`lightning_stiffness.gram.gradient_gram`.
        chunk_size: examples per block of per-example gradients (bounds memory); default from a memory budget.
        seed: seed of the callback's own generator, which draws the probe examples.
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> [N]``, a callable or an import path
            ``"package.module.function"``. Default: cross-entropy with ``reduction="none"``.
        batch_to_xy: turns a batch of probe examples (collated by the training dataloader's ``collate_fn``) into
            ``(x, y)``, a callable or an import path. Default: a tuple's first two entries, or a dict's label
            (``y``, ``label``, ``labels``, ...) and every other entry (one: positional; several: keyword arguments).
        forward_fn: ``forward_fn(pl_module, x) -> outputs``, a callable or an import path, for a module called
            otherwise than ``pl_module(x)`` / ``(*x)`` / ``(**x)`` (required when it has no ``forward``).
        num_distance_bins: bins of the stiffness-against-distance curves.
        save_raw: write each probe's raw results to ``{log_dir}/stiffness/epoch=E-step=S.pt``.
        log_images: log class-matrix and distance-curve images (TensorBoard, W&B, MLflow; PNG files otherwise).
        images_every_n_probes: images of every n-th probe, and always of the last.
        class_names: names for the class axes; default: the training dataset's ``classes`` attribute, or the labels.
        per_layer: also measure each layer's own gradients (``stiffness/{pair}/{kind}/by_layer/{layer}/...``).
        layers: module names (``pl_module.named_modules()``) whose outputs give distances: a curve and a ξ each.
        layer_distance: metric of the representation distances: ``"cosine"`` (1 - cos) or ``"euclidean"``.
        prefix: first part of every tag and raw folder, and the :attr:`state_key`: one each for several callbacks.
        strict: raise a probe's unexpected failures (bugs) instead of skipping the probe with a warning; expected
            ones (non-finite loss, out of memory, full disk) are always skipped. Default: the environment variable
            ``LIGHTNING_STIFFNESS_STRICT``.
        num_bootstrap: bootstrap draws of each probe's 95% intervals (the raw results' ``intervals``); 0 for none.
        class_groups: each class's group (a list) or group name -> classes (a dict), for stiffness between groups.
        dataset_every_n_epochs: at every n-th epoch's end, exact class stiffness over the whole training set; 0: off.

    Raises:
        MisconfigurationException: In ``__init__`` for an argument out of range. At setup without a logger, with a
            sharded strategy (FSDP, DeepSpeed) or an unknown module in ``layers``; when training starts if the
            training data has no integer class labels.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_stiffness import StiffnessCallback
        >>> stiffness = StiffnessCallback(samples_per_class=20, epochs=[0, 1, 4, 9], steps=[10, 30, 100])
        >>> trainer = Trainer(callbacks=[stiffness], max_epochs=10)
    """

    def __init__(
        self,
        samples_per_class: int = 10,
        epochs: list[int] | None = None,
        every_n_epochs: int | None = None,
        steps: list[int] | None = None,
        every_n_steps: int | None = None,
        probe_at_start: bool = True,
        kinds: list[Literal["cosine", "sign"]] | None = None,
        method: Literal["auto", "factored", "torch.func", "loop"] = "auto",
        chunk_size: int | None = None,
        seed: int = 0,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | str | None = None,
        batch_to_xy: Callable[[Any], tuple[Any, Any]] | str | None = None,
        forward_fn: Callable[[Any, Any], Any] | str | None = None,
        num_distance_bins: int = 20,
        save_raw: bool = True,
        log_images: bool = True,
        images_every_n_probes: int = 1,
        class_names: list[str] | None = None,
        per_layer: bool = False,
        layers: list[str] | None = None,
        layer_distance: Literal["cosine", "euclidean"] = "cosine",
        prefix: str = PREFIX,
        strict: bool | None = None,
        num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP,
        class_groups: ClassGroups | None = None,
        dataset_every_n_epochs: int = 0,
    ) -> None:
        with _misconfiguration():
            for name, value, minimum in (("samples_per_class", samples_per_class, 2), ("seed", seed, 0)):
                check_int(value, name, minimum)
            self._schedule = ProbeSchedule(epochs, every_n_epochs, steps, every_n_steps, probe_at_start)
            chosen_kinds = _check_kinds(kinds)
            _check_engine(method, chunk_size, num_distance_bins, images_every_n_probes)
            self._loss_fn = resolve_callable(loss_fn, "loss_fn") or default_loss_fn
            self._batch_to_xy = resolve_callable(batch_to_xy, "batch_to_xy")
            self._forward_fn = resolve_callable(forward_fn, "forward_fn")
            _check_names(class_names, layers, layer_distance, prefix)
            self._extras = ExtraMeasures(num_bootstrap, class_groups, dataset_every_n_epochs, seed, prefix)

        self.samples_per_class = samples_per_class
        self.epochs = epochs if epochs is None else list(self._schedule.epochs)
        self.every_n_epochs, self.steps, self.every_n_steps = self._schedule.every_n_epochs, steps, every_n_steps
        self.probe_at_start = probe_at_start
        self.kinds = chosen_kinds
        self.method, self.chunk_size = method, chunk_size
        self.seed, self.num_distance_bins = seed, num_distance_bins
        self.save_raw, self.log_images, self.images_every_n_probes = save_raw, log_images, images_every_n_probes
        self.class_names, self.per_layer = class_names, per_layer
        self.layers, self.layer_distance = layers, layer_distance
        self.prefix = prefix
        self.strict = strict_default() if strict is None else strict

        self._idle = False
        self._probes: ProbeSets | None = None
        self._restored_indices: dict[str, Tensor] = {}
        self._probes_done = 0
        self._ended_fit = False
        self._warned: set[str] = set()
        self._options = _probe_options(self, layers or [])
        self._scalars = ScalarWriter(prefix)
        self._images = ImageWriter(prefix, images_every_n_probes, rank_zero_warn)
        self._raw = RawWriter(Path(prefix))
        #: The most recent probe's result on this process (``None`` before the first probe).
        self.last_result: StiffnessResult | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ----------------------------------------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_trainer(trainer)
        _check_forward(pl_module, self._forward_fn)
        _start_fit(self)
        self._idle = bool(trainer.fast_dev_run)
        if self._idle:
            rank_zero_info("StiffnessCallback: idle under `fast_dev_run` (no probes, nothing logged).")
            return
        if self.layers:
            with _misconfiguration():
                self._options = _probe_options(self, check_layer_names(pl_module, self.layers))
        if self.log_images and trainer.is_global_zero:
            self._images.start()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._idle:
            return
        log_dir = run_directory(trainer)  # a collective call under DDP: here, on every process
        self._raw, self._images.directory = RawWriter(log_dir / self.prefix), log_dir
        with preserved_rng(pl_module.device):
            self._build_probe_sets(trainer)
        if self._schedule.due_at_start(trainer.global_step):
            self._probe(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._probes is not None and self._schedule.due_at_step(trainer.global_step):
            self._probe(trainer, pl_module)
        self._images.deliver(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probes is not None and self._schedule.due_at_epoch_end(trainer.current_epoch, trainer.global_step):
            self._probe(trainer, pl_module)
        self._extras.measure_dataset(self, trainer, pl_module)
        self._scalars.publish(trainer, pl_module)  # the latest values, at every check until the next probe
        self._images.deliver(trainer)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._scalars.publish(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule, *exception: BaseException) -> None:
        self._images.finish(trainer)  # every probe's images, the last one's included; the worker stops

    on_exception = on_train_end

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            _end_fit(self)

    @override
    def state_dict(self) -> dict[str, Any]:
        indices = {name: probe.indices.clone() for name, probe in (self._probes.sets if self._probes else {}).items()}
        drawn_with = {"seed": self.seed, "samples_per_class": self.samples_per_class}
        return {**drawn_with, "indices": indices, "probes_done": self._probes_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_indices = {name: torch.as_tensor(idx) for name, idx in state_dict.get("indices", {}).items()}
        self._probes_done = int(state_dict.get("probes_done", 0))
        self._ended_fit = False  # a restored state is the next fit's
        if self._restored_indices:
            _warn_if_drawn_differently(state_dict, {"seed": self.seed, "samples_per_class": self.samples_per_class})

    def _build_probe_sets(self, trainer: Trainer) -> None:
        broadcast = Communicator.from_trainer(trainer).broadcast
        with _misconfiguration():
            self._probes, short = build_probe_sets(
                _datasets(trainer, self._warn_once),
                self.samples_per_class,
                self.seed,
                batch_to_xy=self._batch_to_xy,
                collate_fn=find_collate_fn(trainer.train_dataloader),
                restored=self._restored_indices,
                broadcast=broadcast,
                class_names=self.class_names,
            )
        _check_and_report_probe_sets(self, short)

    # --------------------------------------------------------------------------------------------- probes and writing

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        self._schedule.done(step)
        started = time.perf_counter()
        try:
            result = _measure(self, trainer, pl_module, epoch, step)
        except Exception as err:  # an expected failure must never stop training: it is reported and skipped
            self._skip(err, is_expected(err), f"the probe at {probe_label(epoch, step)} was skipped")
            return
        seconds = time.perf_counter() - started
        self.last_result = result
        self._probes_done += 1
        self._scalars.write(trainer, result, seconds)
        written = time.perf_counter()
        if trainer.is_global_zero:
            _write_files(self, trainer, result)
        rank_zero_info(
            f"StiffnessCallback: the probe at {probe_label(epoch, step)} took {seconds:.2f} s "
            f"(+ {time.perf_counter() - written:.2f} s sending images and writing raw results)."
        )

    def _skip(self, error: Exception, expected: bool, what: str) -> None:
        """Warn that ``what`` happened because of ``error``; in strict mode, raise an unexpected ``error`` instead."""
        if self.strict and not expected:
            raise error
        rank_zero_warn(f"StiffnessCallback: {what}: {type(error).__name__}: {error}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _measure(
    callback: StiffnessCallback, trainer: Trainer, pl_module: LightningModule, epoch: int, step: int
) -> StiffnessResult:
    """One probe's result: eval mode, random states kept, gradients on, a progress bar on rank 0."""
    probes, comm = callback._probes, Communicator.from_trainer(trainer)
    show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
    with preserved_rng(pl_module.device), eval_mode(pl_module), torch.inference_mode(False), torch.enable_grad():
        with progress_bar(show_progress, f"Stiffness probe ({probe_label(epoch, step)})") as progress:
            # Inputs converted as the precision plugin converts a batch (bf16-true, 64-true); the hooks run outside
            # the training step's autocast, so under mixed precision the probe runs in full precision.
            options = {"epoch": epoch, "step": step, "progress": progress}
            options["convert_input"] = trainer.precision_plugin.convert_input
            result = measure_probe(pl_module, probes.sets, probes.num_classes, callback._options, comm, **options)
            return callback._extras.add(result)  # bootstrap intervals and class groups, from the matrices


def _check_and_report_probe_sets(callback: StiffnessCallback, short: dict[str, Any]) -> None:
    """Check what depends on the classes now that they are known (before any probe), and say what is probed."""
    probes = callback._probes
    with _misconfiguration():
        callback._extras.check_classes(probes.num_classes)
    for name, counts in short.items():
        rank_zero_warn(
            f"StiffnessCallback: in the {SET_WORDS[name]} dataset, some classes have fewer than "
            f"{callback.samples_per_class} examples and are probed with all they have: {counts} (class: count)."
        )
    sizes = ", ".join(f"{len(p)} {name}" for name, p in probes.sets.items())
    rank_zero_info(f"StiffnessCallback: probing {sizes} examples over {probes.num_classes} classes.")


def _end_fit(callback: StiffnessCallback) -> None:
    """After a fit (also one that never trained: the worker started at setup stops). The state stays as it is (a
    checkpoint saved after ``fit`` holds it) until a next ``fit`` starts (:func:`_start_fit`)."""
    callback._images.close()
    callback._ended_fit = True


def _start_fit(callback: StiffnessCallback) -> None:
    """A ``fit`` after an earlier one with the same callback starts its schedule and monitored values afresh, and its
    probe count unless a checkpoint restored it in between (``load_state_dict``)."""
    callback._schedule.reset()
    callback._scalars.latest = {}
    if callback._ended_fit:
        callback._probes_done = 0
    callback._ended_fit = False


def _write_files(callback: StiffnessCallback, trainer: Trainer, result: StiffnessResult) -> None:
    """Send the probe's images to be drawn and write its raw results, as the callback's arguments say."""
    try:
        if callback.log_images:
            names = callback._probes.class_names
            callback._images.write(trainer, result, names, probe_number=callback._probes_done)
        if callback.save_raw:
            callback._raw.write(result)
    except Exception as err:  # a full disk or a broken logger must not stop training either
        what = f"writing the images or raw results of the probe at {probe_label(result.epoch, result.step)} failed"
        callback._skip(err, isinstance(err, OSError), what)


def _probe_options(callback: StiffnessCallback, layers: list[str]) -> ProbeOptions:
    """How ``callback`` measures, with its ``layers`` resolved (in network order)."""
    return ProbeOptions(
        kinds=callback.kinds,
        loss_fn=callback._loss_fn,
        method=callback.method,
        chunk_size=callback.chunk_size,
        per_layer=callback.per_layer,
        layers=tuple(layers),
        layer_distance=callback.layer_distance,
        num_distance_bins=callback.num_distance_bins,
        keep_matrices=callback.save_raw or callback._extras.needs_matrices,
        forward_fn=callback._forward_fn,
    )


def _check_forward(pl_module: LightningModule, forward_fn: Callable[[Any, Any], Any] | None) -> None:
    """A module without its own ``forward`` needs ``forward_fn`` (the probe cannot guess how to call it)."""
    defaults = {cls.forward for cls in lightning_classes("core", "LightningModule")} | {torch.nn.Module.forward}
    if forward_fn is None and type(pl_module).forward in defaults:
        raise MisconfigurationException(
            f"StiffnessCallback: {type(pl_module).__name__} has no `forward`, so the probe cannot call it. Pass "
            "`forward_fn=lambda module, x: module.model(x)` (`module.model(**x)` for dict batches, `(*x)` for "
            "tuples; or an import path) to say how to get outputs from x."
        )


def _warn_if_drawn_differently(state_dict: dict[str, Any], settings: dict[str, Any]) -> None:
    """Warn when a checkpoint's probe examples were drawn with other ``settings`` than the callback's."""
    differing = [name for name, value in settings.items() if state_dict.get(name, value) != value]
    if differing:
        theirs = ", ".join(f"{name}={state_dict[name]}" for name in differing)
        mine = ", ".join(f"{name}={settings[name]}" for name in differing)
        rank_zero_warn(
            f"StiffnessCallback: the checkpoint's probe examples were drawn with {theirs}, and this callback has "
            f"{mine}. The checkpoint's examples are probed, so the resumed run stays comparable; start a new run to "
            "probe other examples."
        )


@contextmanager
def _misconfiguration() -> Iterator[None]:
    """A ``ValueError`` about the callback's arguments or data, as Lightning's ``MisconfigurationException``."""
    try:
        yield
    except ValueError as err:
        # The callback's own message, first and once (LightningCLI shows the first exception of a chain first).
        raise MisconfigurationException(f"StiffnessCallback: {err}") from None


def _datasets(trainer: Trainer, warn_once: Callable[[str, str], None]) -> dict[str, Any]:
    """The first training dataset and, when validation runs, the first validation dataset."""
    found = {"train": find_datasets(trainer.train_dataloader)}
    if trainer.val_dataloaders is not None and trainer.limit_val_batches != 0:
        found["val"] = find_datasets(trainer.val_dataloaders)
    if not found["train"]:
        raise MisconfigurationException("StiffnessCallback could not find the training dataset.")
    for name, datasets in found.items():
        if len(datasets) > 1:
            what = SET_WORDS[name]
            warn_once(what, f"StiffnessCallback: several {what} dataloaders; probing the first one's dataset.")
    return {name: datasets[0] for name, datasets in found.items() if datasets}


def resolve_callable(value: Callable[..., Any] | str | None, name: str) -> Callable[..., Any] | None:
    """A callable given directly or as an import path ``"package.module.function"``."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str) or "." not in value:
        raise ValueError(f"`{name}` must be a callable or an import path 'package.module.function', got {value!r}.")
    module_name, _, attribute = value.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`{name}`: cannot import {value!r} ({err}).") from err
    if not callable(resolved):
        raise ValueError(f"`{name}`: {value!r} is not callable.")
    return resolved


def _check_kinds(kinds: list[str] | None) -> tuple[str, ...]:
    """The chosen kinds, in the order of :data:`~lightning_stiffness.names.KINDS`."""
    chosen = list(KINDS) if kinds is None else list(kinds)
    if not chosen or any(kind not in KINDS for kind in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"`kinds` must be distinct values among {list(KINDS)}, got {kinds!r}.")
    return tuple(kind for kind in KINDS if kind in chosen)


def _check_engine(method: str, chunk_size: int | None, num_distance_bins: int, images_every_n_probes: int) -> None:
    check_choice(method, "method", METHODS)
    if chunk_size is not None:
        check_int(chunk_size, "chunk_size")
    check_int(num_distance_bins, "num_distance_bins")
    check_int(images_every_n_probes, "images_every_n_probes")


def _check_names(class_names: list[str] | None, layers: list[str] | None, layer_distance: str, prefix: str) -> None:
    check_choice(layer_distance, "layer_distance", DISTANCE_METRICS)
    if class_names is not None and not all(isinstance(name, str) for name in class_names):
        raise ValueError(f"`class_names` must be a list of strings, got {class_names!r}.")
    if layers is not None and (not isinstance(layers, (list, tuple)) or not layers):
        raise ValueError(f"`layers` must be a non-empty list of module names, got {layers!r}.")
    if not isinstance(prefix, str) or not prefix.strip("/") or prefix != prefix.strip().strip("/"):
        raise ValueError(f"`prefix` must be a non-empty tag prefix such as 'stiffness', got {prefix!r}.")


def _check_trainer(trainer: Trainer) -> None:
    """Refuse strategies whose processes each hold only part of the parameters, and a Trainer without loggers."""
    if isinstance(trainer.strategy, lightning_classes("strategies", *_SHARDED_STRATEGIES)):
        raise MisconfigurationException(
            f"StiffnessCallback does not support the sharded strategy {type(trainer.strategy).__name__}: each process "
            "holds only part of the parameters, so per-example gradients over all of them cannot be formed. Use a "
            "single device or `strategy='ddp'`."
        )
    if not trainer.fast_dev_run and not trainer.loggers:
        raise MisconfigurationException(
            "StiffnessCallback needs a logger to write its scalars and images; the Trainer has none "
            "(`logger=False`). Pass `logger=True` or a logger such as TensorBoardLogger."
        )
