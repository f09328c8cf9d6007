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

import contextlib
import copy
import importlib
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stiffness.callback.distributed import Communicator
from lightning_stiffness.callback.isolation import eval_mode, preserved_rng
from lightning_stiffness.callback.probe_sets import (
    SET_WORDS,
    ProbeSets,
    build_probe_sets,
    find_collate_fn,
    find_datasets,
    first_loader,
    with_collate,
)
from lightning_stiffness.callback.probing import ProbeOptions, check_probe_loss, measure_dataset, measure_probe
from lightning_stiffness.callback.progress import progress_bar
from lightning_stiffness.callback.schedule import ProbeSchedule
from lightning_stiffness.callback.writers import RawWriter, ScalarWriter, run_directory
from lightning_stiffness.exceptions import is_expected, strict_default
from lightning_stiffness.gram import METHODS, GramOptions
from lightning_stiffness.gram.validation import check_choice, check_int, default_loss_fn
from lightning_stiffness.images.image_writer import ImageWriter
from lightning_stiffness.images.specs import dataset_specs
from lightning_stiffness.lightning_compat import lightning_classes
from lightning_stiffness.measures.groups import ClassGroups, add_group_measures, check_class_groups, resolve_groups
from lightning_stiffness.measures.intervals import add_intervals
from lightning_stiffness.measures.representations import check_layer_names
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import DISTANCE_METRICS, INPUT, KINDS, PREFIX, probe_label

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
#: Bootstrap draws by default: with 50 examples a class (500 + 500 probe examples, the benchmark's setting) the
#: intervals and curve bands add less than half of the probe's own time (benchmarks/README.md); percentiles at 2.5%
#: and 97.5% of 200 draws move by about +-0.1 standard errors from one seed to the next.
DEFAULT_NUM_BOOTSTRAP = 200

_Built = TypeVar("_Built")


class StiffnessCallback(Callback):
    """Measure gradient stiffness on fixed probe examples at chosen epochs or steps and log it.

    Stiffness between examples i, j is cos(g_i, g_j) or sign(g_i · g_j) of their loss gradients. Each probe logs
    scalars (`stiffness/{pair}/{kind}/within_class`, ...) and images to every logger at the global step, raw results
    under `log_dir`, and keeps the latest scalars available to monitors. Training is unchanged (modes, parameters,
    gradients and random states are restored after each probe).

    Each argument is a public attribute of the same name; one set after construction takes effect when the next
    `fit` sets up (and is checked there as in `__init__`). Several callbacks can share a Trainer: the
    `state_key` holds `prefix` and `kinds`, so each callback resumes its own probe examples from a
    checkpoint (one written when the key was the prefix alone still loads, when a single callback has that prefix).
    Two callbacks with the same `prefix` and `kinds` would log the same tags: Lightning refuses them at
    `Trainer(...)` ("Found more than one stateful callback"). Callbacks with one `prefix` and other `kinds` log
    their kinds' tags apart, but share the tags that name no kind and the raw folder (a warning says so): give each
    callback its own `prefix` to keep everything apart.

    Args:
        samples_per_class: probe examples drawn per class from the training set and from the validation set.
        epochs: epochs (Lightning's, 0-based) at whose end to probe. Cannot be combined with `every_n_epochs`.
        every_n_epochs: probe at the end of every n-th epoch; 0 for none. Default: 1, unless `epochs`, `steps`
            or `every_n_steps` is given.
        steps: global steps (optimiser steps taken, >= 1) after which to probe, alone or with an epoch schedule.
        every_n_steps: probe after every n-th optimiser step. A step is never probed twice.
        probe_at_start: probe once when training starts, before the first optimiser step ("initialisation").
        kinds: stiffness kinds to measure, among `"cosine"` and `"sign"`. Default: both.
        method: Gram engine, see `lightning_stiffness.gram.gradient_gram`.
        chunk_size: examples per block of per-example gradients (bounds memory); default from a memory budget.
        seed: seed of the callback's own generator, which draws the probe examples.
        loss_fn: per-example loss `loss_fn(outputs, targets) -> [N]`, a callable or an import path
            `"package.module.function"`. Default: cross-entropy with `reduction="none"`.
        batch_to_xy: turns a batch of probe examples (collated by `probe_collate_fn`) into
            `(x, y)`, a callable or an import path. Default: a tuple's first two entries, or a dict's label
            (`y`, `label`, `labels`, ...) and every other entry (one: positional; several: keyword arguments).
        probe_collate_fn: batches the probe examples (and the training set's, for `dataset_every_n_epochs`), a
            callable or an import path. Default: the training dataloader's `collate_fn`, which must then be
            deterministic: one that mixes or augments examples at random (mixup, CutMix) is refused, since every
            probe would measure other blends; pass the collate without its augmentation here.
        forward_fn: `forward_fn(pl_module, x) -> outputs`, a callable or an import path, for a module called
            otherwise than `pl_module(x)` / `(*x)` / `(**x)` (required when it has no `forward`).
        num_distance_bins: bins of the stiffness-against-distance curves.
        save_raw: write each probe's raw results to `{log_dir}/stiffness/epoch=E-step=S.pt`.
        log_images: log class-matrix and distance-curve images (TensorBoard, W&B, MLflow; PNG files otherwise).
        images_every_n_probes: images of every n-th probe, and always of the last.
        class_names: names for the class axes; default: the training dataset's `classes` attribute, or the labels.
        per_layer: also measure each layer's own gradients (`stiffness/{pair}/{kind}/by_layer/{layer}/...`).
        layers: module names (`pl_module.named_modules()`) whose outputs give distances: a curve and a ξ each
            (not `"input"`: that is input space's name).
        layer_distance: metric of the representation distances: `"cosine"` (1 - cos) or `"euclidean"`.
        prefix: first part of every tag and of the raw folder: give each of several callbacks its own.
        strict: raise a probe's unexpected failures (bugs) instead of skipping the probe with a warning; expected
            ones (non-finite loss, out of memory, full disk) are always skipped. Default: the environment variable
            `LIGHTNING_STIFFNESS_STRICT`.
        num_bootstrap: bootstrap draws of each probe's 95% intervals (the raw results' `intervals`); 0 for none.
        class_groups: each class's group (a list) or group name -> classes (a dict), for stiffness between groups.
        dataset_every_n_epochs: at every n-th epoch's end, exact class stiffness over the whole training set; 0: off.

    Raises:
        MisconfigurationException: In `__init__` for an argument out of range. At setup without a logger, with a
            sharded strategy (FSDP, DeepSpeed) or an unknown module in `layers`; when training starts if the
            training data has no integer class labels, the collate is random (`probe_collate_fn`), or `loss_fn`
            does not return one loss per example of the model's outputs.

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
        # `str` first: jsonargparse tries a union's members in order, so an import path stays the string given
        # and `--print_config` and the saved config.yaml write it back as given. `loss_fn` returns a tensor of
        # per-example losses, annotated `Any`: jsonargparse reads a callable returning a class as a factory of
        # that class, and would list every Tensor subclass (Parameter, ...) in `--help`.
        loss_fn: str | Callable[[Tensor, Tensor], Any] | None = None,
        batch_to_xy: str | Callable[[Any], tuple[Any, Any]] | None = None,
        forward_fn: str | Callable[[Any, Any], Any] | None = None,
        probe_collate_fn: str | Callable[[list[Any]], Any] | None = None,
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
        # Each argument is stored once, here; what the callback derives from them is derived in `setup`, so a
        # setting changed after construction takes effect at the next fit.
        self.samples_per_class, self.seed = samples_per_class, seed
        self.epochs, self.every_n_epochs, self.steps, self.every_n_steps = epochs, every_n_epochs, steps, every_n_steps
        self.probe_at_start = probe_at_start
        self.kinds: Sequence[str] | None = kinds
        self.method, self.chunk_size = method, chunk_size
        self.loss_fn, self.batch_to_xy, self.forward_fn = loss_fn, batch_to_xy, forward_fn
        self.probe_collate_fn = probe_collate_fn
        self.num_distance_bins = num_distance_bins
        self.save_raw, self.log_images, self.images_every_n_probes = save_raw, log_images, images_every_n_probes
        self.class_names, self.per_layer = class_names, per_layer
        self.layers, self.layer_distance = layers, layer_distance
        self.prefix = prefix
        self.strict = strict_default() if strict is None else strict
        self.num_bootstrap, self.class_groups = num_bootstrap, class_groups
        self.dataset_every_n_epochs = dataset_every_n_epochs
        with _misconfiguration():
            settings = self._checked_settings()
        self.kinds = settings.kinds  # in the order of `names.KINDS`
        schedule_epochs = settings.schedule.epochs  # None exactly when `epochs` is
        self.epochs = None if schedule_epochs is None else list(schedule_epochs)  # sorted, each once

        # Derived in `setup` (and in `on_train_start`, where the run directory is known).
        self._settings: _Settings | None = None
        self._probe_options: ProbeOptions | None = None
        self._scalars: ScalarWriter | None = None
        self._images: ImageWriter | None = None
        self._raw: RawWriter | None = None
        # State: the probe examples and what survives a resume.
        self._idle = False
        self._probes: ProbeSets | None = None
        self._restored_indices: dict[str, Tensor] = {}
        self._probes_done = 0
        self._ended_fit = False
        self._warned: set[str] = set()
        #: The most recent probe's result on this process (``None`` before the first probe).
        self.last_result: StiffnessResult | None = None

    @property
    @override
    def state_key(self) -> str:
        """The settings that tell two callbacks' outputs apart: the tags' ``prefix`` and the ``kinds`` they measure.
        Lightning refuses two callbacks with the same key in one Trainer (they would log the same tags), and each
        callback finds its own state in a checkpoint under it."""
        return self._generate_state_key(
            prefix=self.prefix, kinds=[kind for kind in KINDS if kind in (self.kinds or KINDS)]
        )

    @property
    def _prefix_state_key(self) -> str:
        """The key of checkpoints written before :attr:`state_key` held more than the prefix."""
        return self._generate_state_key(prefix=self.prefix)

    # What `setup` (and `on_train_start`) build, for the code that runs after them: a clear error, not an
    # AttributeError on None, if a hook is called before them.

    @property
    def _built_settings(self) -> "_Settings":
        return _built(self._settings, "the checked settings")

    @property
    def _built_options(self) -> ProbeOptions:
        return _built(self._probe_options, "the probe options")

    @property
    def _scalar_writer(self) -> ScalarWriter:
        return _built(self._scalars, "the scalar writer")

    @property
    def _image_writer(self) -> ImageWriter:
        return _built(self._images, "the image writer")

    @property
    def _raw_writer(self) -> RawWriter:
        return _built(self._raw, "the raw writer", "on_train_start()")

    @property
    def _probe_sets(self) -> ProbeSets:
        return _built(self._probes, "the probe sets", "on_train_start()")

    # ----------------------------------------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        with _misconfiguration():
            self._settings = settings = self._checked_settings()
        _check_trainer(trainer)
        _check_forward(pl_module, settings.gram.forward_fn)
        self._start_fit()
        self._idle = bool(_fast_dev_run(trainer))
        if self._idle:
            rank_zero_info("StiffnessCallback: idle under `fast_dev_run` (no probes, nothing logged).")
            return
        layers = []
        if self.layers:
            with _misconfiguration():
                layers = check_layer_names(pl_module, self.layers)
        self._probe_options = self._probe_options_for(settings, layers)
        self._warn_if_sharing_prefix(trainer)
        if self.log_images and trainer.is_global_zero:
            self._image_writer.start()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._idle:
            return
        log_dir = run_directory(trainer)  # a collective call under DDP: here, on every process
        self._raw, self._image_writer.directory = RawWriter(log_dir / self.prefix, trainer.loggers), log_dir
        with preserved_rng(pl_module.device):
            self._build_probe_sets(trainer)
            # Once, before any probe: a loss every probe would fail on (a mean, outputs without logits) is refused.
            with eval_mode(pl_module), _misconfiguration(ValueError, TypeError):
                convert = trainer.precision_plugin.convert_input
                check_probe_loss(pl_module, self._probe_sets.sets["train"], self._built_options, convert)
        if self._built_settings.schedule.due_at_start(trainer.global_step):
            self._probe(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._probes is not None and self._built_settings.schedule.due_at_step(trainer.global_step):
            self._probe(trainer, pl_module)
        self._image_writer.deliver(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._probes is not None and self._built_settings.schedule.due_at_epoch_end(epoch, trainer.global_step):
            self._probe(trainer, pl_module)
        if self._probes is not None and _dataset_due(self.dataset_every_n_epochs, epoch):
            self._measure_dataset(trainer, pl_module)
        self._scalar_writer.publish(trainer, pl_module)  # the latest values, at every check until the next probe
        self._image_writer.deliver(trainer)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._scalars is not None and not trainer.sanity_checking:
            self._scalars.publish(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_images(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish_images(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit()

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

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written when :attr:`state_key` was the prefix alone: its state is this callback's when no
        other callback of the Trainer could claim it (Lightning then loads nothing under the new key)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._prefix_state_key not in states:
            return
        claimants = [
            cb
            for cb in _trainer_callbacks(trainer)
            if isinstance(cb, StiffnessCallback)
            and cb.state_key not in states
            and cb._prefix_state_key == self._prefix_state_key
        ]
        if len(claimants) > 1:
            self._warn_once(
                "ambiguous checkpoint",
                f"StiffnessCallback: the checkpoint holds one callback's probe examples under the old key "
                f"{self._prefix_state_key!r}, and {len(claimants)} callbacks of this Trainer have prefix "
                f"{self.prefix!r}; none of them takes it, so each draws its own examples. Give the callback that "
                "wrote the checkpoint its prefix alone to resume its examples.",
            )
            return
        self.load_state_dict(copy.deepcopy(states[self._prefix_state_key]))
        rank_zero_info(
            f"StiffnessCallback: resumed its probe examples from the checkpoint's state under the old key "
            f"{self._prefix_state_key!r} (now {self.state_key!r}); Lightning's warning asking for a callback with the "
            "old key can be ignored."
        )

    # ------------------------------------------------------------------------------------- settings and derived helpers

    def _checked_settings(self) -> "_Settings":
        """The settings checked (a ``ValueError`` naming the argument) and what the callback derives from them."""
        for name, minimum in (("samples_per_class", 2), ("seed", 0)):
            check_int(getattr(self, name), name, minimum)
        schedule = ProbeSchedule(self.epochs, self.every_n_epochs, self.steps, self.every_n_steps, self.probe_at_start)
        kinds = _check_kinds(self.kinds)
        _check_engine(self.method, self.chunk_size, self.num_distance_bins, self.images_every_n_probes)
        loss_fn = resolve_callable(self.loss_fn, "loss_fn") or default_loss_fn
        batch_to_xy = resolve_callable(self.batch_to_xy, "batch_to_xy")
        probe_collate_fn = resolve_callable(self.probe_collate_fn, "probe_collate_fn")
        forward_fn = resolve_callable(self.forward_fn, "forward_fn")
        _check_names(self.class_names, self.layers, self.layer_distance, self.prefix)
        _check_extras(self.num_bootstrap, self.class_groups, self.dataset_every_n_epochs)
        gram = GramOptions(loss_fn=loss_fn, forward_fn=forward_fn, method=self.method, chunk_size=self.chunk_size)
        return _Settings(schedule, kinds, gram, batch_to_xy, probe_collate_fn)

    def _probe_options_for(self, settings: "_Settings", layers: list[str]) -> ProbeOptions:
        """How a probe measures, from the checked ``settings``, with ``layers`` resolved (in network order)."""
        return ProbeOptions(
            kinds=settings.kinds,
            gram=settings.gram,
            per_layer=self.per_layer,
            layers=tuple(layers),
            layer_distance=self.layer_distance,
            num_distance_bins=self.num_distance_bins,
            keep_matrices=self.save_raw or self.num_bootstrap > 0 or self.class_groups is not None,
        )

    def _start_fit(self) -> None:
        """A ``fit`` starts its schedule (from the checked settings), its writers and monitored values afresh, and
        its probe count unless a checkpoint restored it after an earlier ``fit`` (``load_state_dict``)."""
        self._scalars = ScalarWriter(self.prefix, dataset=self.dataset_every_n_epochs > 0)
        if self._images is not None:
            self._images.close()
        self._images = ImageWriter(self.prefix, self.images_every_n_probes, rank_zero_warn)
        if self._ended_fit:
            self._probes_done = 0
        self._ended_fit = False

    def _finish_images(self, trainer: Trainer) -> None:
        """At the end of training, also one ended by an exception."""
        if self._images is not None:
            self._images.finish(trainer)  # every probe's images, the last one's included; the worker stops

    def _end_fit(self) -> None:
        """After a fit (also one that never trained: the worker started at setup stops). The state stays as it is
        (a checkpoint saved after ``fit`` holds it) until a next ``fit`` starts (:meth:`_start_fit`)."""
        if self._images is not None:
            self._images.close()
        self._ended_fit = True

    def _warn_if_sharing_prefix(self, trainer: Trainer) -> None:
        """Callbacks with one prefix share the tags that do not name a kind and the raw folder: say so, once."""
        sharing = [
            cb for cb in _trainer_callbacks(trainer) if isinstance(cb, StiffnessCallback) and cb.prefix == self.prefix
        ]
        if len(sharing) > 1 and sharing[0] is self:
            rank_zero_warn(
                f"StiffnessCallback: {len(sharing)} callbacks write under the prefix {self.prefix!r}. Their kinds' "
                "own scalars and images stay apart, but the critical distances, gradient coherence and diversity, "
                f"probe times, distance curves and the raw files `{self.prefix}/epoch=E-step=S.pt` are written by "
                "each under one name. Give each callback its own `prefix` to keep all of them apart."
            )

    # --------------------------------------------------------------------------------------------- probes and writing

    def _build_probe_sets(self, trainer: Trainer) -> None:
        broadcast = Communicator.from_trainer(trainer).broadcast
        with _misconfiguration():
            self._probes, short = build_probe_sets(
                _datasets(trainer, self._warn_once),
                self.samples_per_class,
                self.seed,
                batch_to_xy=self._built_settings.batch_to_xy,
                collate_fn=self._built_settings.probe_collate_fn or find_collate_fn(trainer.train_dataloader),
                collate_name="probe_collate_fn" if self._built_settings.probe_collate_fn else None,
                restored=self._restored_indices,
                broadcast=broadcast,
                class_names=self.class_names,
            )
            if self.class_groups is not None:  # now that the classes are known, before any probe
                resolve_groups(self.class_groups, self._probes.num_classes)
        for name, counts in short.items():
            rank_zero_warn(_short_classes_message(name, counts, self.samples_per_class))
        sizes = ", ".join(f"{len(p)} {name}" for name, p in self._probes.sets.items())
        rank_zero_info(f"StiffnessCallback: probing {sizes} examples over {self._probes.num_classes} classes.")

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        self._built_settings.schedule.done(step)
        started = time.perf_counter()
        try:
            result = self._measure(trainer, pl_module, epoch, step)
        except Exception as err:  # an expected failure must never stop training: it is reported and skipped
            self._skip(err, is_expected(err), f"the probe at {probe_label(epoch, step)} was skipped")
            return
        seconds = time.perf_counter() - started
        self.last_result = result
        self._probes_done += 1
        self._scalar_writer.write(trainer, result, seconds)
        written = time.perf_counter()
        if trainer.is_global_zero:
            self._write_files(trainer, result)
        rank_zero_info(
            f"StiffnessCallback: the probe at {probe_label(epoch, step)} took {seconds:.2f} s "
            f"(+ {time.perf_counter() - written:.2f} s sending images and writing raw results)."
        )

    def _measure(self, trainer: Trainer, pl_module: LightningModule, epoch: int, step: int) -> StiffnessResult:
        """One probe's result: eval mode, random states kept, gradients on, a progress bar on rank 0; its bootstrap
        intervals and class groups added from its matrices."""
        probes, comm = self._probe_sets, Communicator.from_trainer(trainer)
        with _measuring(trainer, pl_module, f"Stiffness probe ({probe_label(epoch, step)})") as progress:
            # Inputs converted as the precision plugin converts a batch (bf16-true, 64-true); the hooks run outside
            # the training step's autocast, so under mixed precision the probe runs in full precision.
            options = {"epoch": epoch, "step": step, "progress": progress}
            options["convert_input"] = trainer.precision_plugin.convert_input
            result = measure_probe(pl_module, probes.sets, probes.num_classes, self._built_options, comm, **options)
            if self.num_bootstrap > 0 and result.has_stiffness:
                add_intervals(result, self.num_bootstrap, self.seed)
            if self.class_groups is not None and result.has_stiffness:
                add_group_measures(result, self.class_groups)
            return result

    def _measure_dataset(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The whole training set's class matrix (each process its shard, sums reduced), written as a probe's result
        is: scalars to every logger at the global step, its raw file and its image. A failure is skipped like a
        probe's."""
        epoch, step, settings = trainer.current_epoch, trainer.global_step, self._built_settings
        try:
            with _measuring(trainer, pl_module, f"Stiffness over the training set (epoch {epoch})") as progress:
                loader = with_collate(first_loader(trainer.train_dataloader), settings.probe_collate_fn)
                result = measure_dataset(
                    pl_module, loader, self._probe_sets.num_classes, settings.gram,
                    Communicator.from_trainer(trainer), epoch=epoch, step=step,
                    batch_to_xy=settings.batch_to_xy, convert_input=trainer.precision_plugin.convert_input,
                    progress=progress,
                )  # fmt: skip
        except Exception as err:  # like a failed probe: reported and skipped, training goes on
            self._skip(err, is_expected(err), f"measuring the training set at epoch {epoch} was skipped")
            return
        self._scalar_writer.write_dataset(trainer, result)
        if trainer.is_global_zero and self.save_raw:
            self._raw_writer.write_dataset(result)
        if trainer.is_global_zero and self.log_images:
            specs = dataset_specs(result.class_matrix, self._probe_sets.class_names, epoch, step, self.prefix)
            self._image_writer.write_specs(specs, epoch, step)

    def _write_files(self, trainer: Trainer, result: StiffnessResult) -> None:
        """Send the probe's images to be drawn and write its raw results, as the callback's arguments say."""
        try:
            if self.log_images:
                self._image_writer.write(trainer, result, self._probe_sets.class_names, probe_number=self._probes_done)
            if self.save_raw:
                self._raw_writer.write(result)
        except Exception as err:  # a full disk or a broken logger must not stop training either
            what = f"writing the images or raw results of the probe at {probe_label(result.epoch, result.step)} failed"
            self._skip(err, isinstance(err, OSError), what)

    def _skip(self, error: Exception, expected: bool, what: str) -> None:
        """Warn that ``what`` happened because of ``error``; in strict mode, raise an unexpected ``error`` instead."""
        if self.strict and not expected:
            raise error
        rank_zero_warn(f"StiffnessCallback: {what}: {type(error).__name__}: {error}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


class _Settings(NamedTuple):
    """What the callback derives from its settings (:meth:`StiffnessCallback._checked_settings`)."""

    schedule: ProbeSchedule
    kinds: tuple[str, ...]
    gram: GramOptions
    batch_to_xy: Callable[[Any], tuple[Any, Any]] | None
    probe_collate_fn: Callable[[list[Any]], Any] | None


def _built(value: _Built | None, what: str, where: str = "setup()") -> _Built:
    """``value``, built by the callback's ``where`` hook; a ``RuntimeError`` if that hook has not run yet."""
    if value is None:
        raise RuntimeError(f"StiffnessCallback: {what} is built in {where}; call Trainer.fit first.")
    return value


def _fast_dev_run(trainer: Trainer) -> int | bool:
    """The Trainer's ``fast_dev_run`` (``False``, ``True`` or a number of batches)."""
    # Lightning sets it in `Trainer.__init__` (trainer/setup.py, `_init_debugging_flags`) without declaring it.
    return trainer.fast_dev_run  # type: ignore[attr-defined]


def _trainer_callbacks(trainer: Trainer) -> list[Callback]:
    """The Trainer's callbacks."""
    # Lightning sets them in `Trainer.__init__` (`_CallbackConnector.on_trainer_init`) without declaring them.
    return trainer.callbacks  # type: ignore[attr-defined]


@contextmanager
def _measuring(trainer: Trainer, pl_module: LightningModule, title: str) -> Iterator[Any]:
    """Eval mode, random states kept, gradients on and a progress bar on rank 0 for one measure."""
    show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
    with preserved_rng(pl_module.device), eval_mode(pl_module), torch.inference_mode(False), torch.enable_grad():
        with progress_bar(show_progress, title) as progress:
            yield progress


def _short_classes_message(name: str, counts: dict[int, int], samples_per_class: int) -> str:
    """The warning about the classes of probe set ``name`` with fewer examples than asked: a few lines whatever
    the number of classes (the first ten named)."""
    shown = ", ".join(f"{label}: {count}" for label, count in list(counts.items())[:10])
    more = f" and {len(counts) - 10} more" if len(counts) > 10 else ""
    return (
        f"StiffnessCallback: in the {SET_WORDS[name]} dataset, {len(counts)} classes have fewer than "
        f"{samples_per_class} examples and are probed with all they have: {{{shown}{more}}} (class: count)."
    )


def _dataset_due(every_n_epochs: int, epoch: int) -> bool:
    """Whether the whole training set is measured at the end of ``epoch`` (0-based)."""
    return every_n_epochs > 0 and (epoch + 1) % every_n_epochs == 0


def _check_extras(num_bootstrap: int, class_groups: ClassGroups | None, dataset_every_n_epochs: int) -> None:
    check_int(num_bootstrap, "num_bootstrap", minimum=0)
    if num_bootstrap == 1:
        raise ValueError("`num_bootstrap` must be 0 (no intervals) or at least 2, got 1.")
    check_int(dataset_every_n_epochs, "dataset_every_n_epochs", minimum=0)
    check_class_groups(class_groups)


def _check_forward(pl_module: LightningModule, forward_fn: Callable[[Any, Any], Any] | None) -> None:
    """A module without its own ``forward`` needs ``forward_fn`` (the probe cannot guess how to call it)."""
    modules = [cls for cls in lightning_classes("core", "LightningModule") if issubclass(cls, torch.nn.Module)]
    defaults = {cls.forward for cls in modules} | {torch.nn.Module.forward}
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
def _misconfiguration(*kinds: type[Exception]) -> Iterator[None]:
    """An error of ``kinds`` (default ``ValueError``) about the callback's arguments or data, as Lightning's
    ``MisconfigurationException``."""
    caught = kinds or (ValueError,)
    try:
        yield
    except caught as err:
        # The callback's own message, first and once (LightningCLI shows the first exception of a chain first).
        raise MisconfigurationException(f"StiffnessCallback: {err}") from None


def _datasets(trainer: Trainer, warn_once: Callable[[str, str], None]) -> dict[str, Any]:
    """The first training dataset and, when validation runs, the first validation dataset."""
    found = {"train": find_datasets(trainer.train_dataloader)}
    if trainer.limit_val_batches != 0 and _validation_loaders(trainer) is not None:
        found["val"] = find_datasets(trainer.val_dataloaders)
    if not found.get("val"):
        warn_once(
            "no validation",
            f"StiffnessCallback: {_no_validation_reason(trainer)}, so the probes take the training set alone: "
            "train-val and val-val are not measured.",
        )
    if not found["train"]:
        raise MisconfigurationException("StiffnessCallback could not find the training dataset.")
    for name, datasets in found.items():
        if len(datasets) > 1:
            what = SET_WORDS[name]
            warn_once(what, f"StiffnessCallback: several {what} dataloaders; probing the first one's dataset.")
    return {name: datasets[0] for name, datasets in found.items() if datasets}


def _no_validation_reason(trainer: Trainer) -> str:
    """Why a run has no validation set to probe, in a few words."""
    if trainer.limit_val_batches == 0:
        return "`limit_val_batches=0` turns validation off"
    defaults = {getattr(cls, "validation_step", None) for cls in lightning_classes("core", "LightningModule")}
    if getattr(type(trainer.lightning_module), "validation_step", None) in defaults:
        return "the module has no `validation_step`, so Lightning runs no validation"
    if not trainer.enable_validation:
        return "there is no validation dataloader"
    return "the validation dataloader has no dataset"


def _validation_loaders(trainer: Trainer) -> Any:
    """The validation dataloaders, requested now when Lightning has not yet done so.

    Lightning requests them when training starts only if the first epoch validates; with
    ``check_val_every_n_epoch=2`` and no sanity check, after the first epoch, when the probe sets are long drawn.
    This does what its fit loop does then (``val_loop.setup_data()`` in the validating state): the loaders are
    requested once, and reloaded as ``reload_dataloaders_every_n_epochs`` says. Nothing is requested when validation
    is off (``trainer.enable_validation``: no ``validation_step``, no loader, ``limit_val_batches=0``).
    """
    if trainer.val_dataloaders is None and trainer.enable_validation:
        trainer.validating = True
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        finally:
            trainer.training = True
    return trainer.val_dataloaders


def resolve_callable(value: Callable[..., Any] | str | None, name: str) -> Callable[..., Any] | None:
    """A function given directly or as an import path ``"package.module.function"``.

    Raises:
        ValueError: naming ``name``, when the path does not import, names a module or something not callable, or
            the value is a class (called on data, a class would be constructed: an instance belongs there).
    """
    if value is not None and not callable(value) and (not isinstance(value, str) or "." not in value):
        raise ValueError(f"`{name}` must be a callable or an import path 'package.module.function', got {value!r}.")
    resolved = _imported(value, name) if isinstance(value, str) else value
    if isinstance(resolved, type):
        shown = f"{resolved.__module__}.{resolved.__qualname__}"
        raise ValueError(
            f"`{name}` is the class {shown}, which would be constructed from the data; give an instance, "
            f"e.g. {resolved.__name__}(...) (in a config: class_path {shown} with init_args)."
        )
    return resolved


def _imported(path: str, name: str) -> Callable[..., Any]:
    module_name, _, attribute = path.rpartition(".")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        with contextlib.suppress(ImportError):
            importlib.import_module(path)  # a module (``package.losses``) rather than a function in one
            raise ValueError(f"`{name}`: {path!r} is a module, not a callable.") from None
        raise ValueError(f"`{name}`: cannot import {path!r} ({err}).") from err
    if isinstance(resolved, types.ModuleType):
        raise ValueError(f"`{name}`: {path!r} is a module, not a callable.")
    if not callable(resolved):
        raise ValueError(f"`{name}`: {path!r} is not callable.")
    return resolved


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
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
    if layers is not None and INPUT in layers:
        raise ValueError(
            f"`layers` may not name a module {INPUT!r}: that name is reserved for input space (the distances between "
            "the inputs themselves, always measured). Give the module another name to measure its outputs."
        )
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
    if not _fast_dev_run(trainer) and not trainer.loggers:
        raise MisconfigurationException(
            "StiffnessCallback needs a logger to write its scalars and images; the Trainer has none "
            "(`logger=False`). Pass `logger=True` or a logger such as TensorBoardLogger."
        )
