"""What the callback adds to a probe's result beyond stiffness: bootstrap intervals, class-group measures, and the
exact class stiffness of the whole training set.

The callback holds one :class:`ExtraMeasures` (its ``num_bootstrap``, ``class_groups`` and
``dataset_every_n_epochs``), calls :meth:`ExtraMeasures.add` on each probe's result and
:meth:`ExtraMeasures.measure_dataset` at each epoch's end. The whole training set's measure is its own point (scalars
at the global step, a raw file ``dataset-epoch=E-step=S.pt`` beside the probes'), independent of the probe schedule.
"""

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stiffness.callback.distributed import Communicator
from lightning_stiffness.callback.isolation import eval_mode, preserved_rng
from lightning_stiffness.callback.progress import progress_bar
from lightning_stiffness.exceptions import is_expected
from lightning_stiffness.gram.validation import check_int
from lightning_stiffness.images.specs import dataset_specs
from lightning_stiffness.measures.batches import default_batch_to_xy
from lightning_stiffness.measures.groups import ClassGroups, add_group_measures, check_class_groups, resolve_groups
from lightning_stiffness.measures.intervals import add_intervals
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.measures.whole_dataset import DatasetResult, class_sums_to_matrix, dataset_class_sums
from lightning_stiffness.names import PREFIX

#: Bootstrap draws by default: with 50 examples a class (500 + 500 probe examples, the benchmark's setting) the
#: intervals and curve bands add less than half of the probe's own time (benchmarks/README.md); percentiles at 2.5%
#: and 97.5% of 200 draws move by about +-0.1 standard errors from one seed to the next.
DEFAULT_NUM_BOOTSTRAP = 200


@dataclass
class ExtraMeasures:
    """The callback's optional measures.

    Args:
        num_bootstrap: bootstrap draws for the 95% intervals of each probe and the bands around its distance curves
            (0: neither).
        class_groups: each class's group (a list) or group name -> classes (a dict); None: no group measures.
        dataset_every_n_epochs: measure the whole training set at the end of every n-th epoch (0: never).
        seed: the callback's seed; each probe's draws come from a generator seeded with it and the probe's step.
        prefix: the tags' first part (keys of the intervals).

    Raises:
        ValueError: for a negative count or a ``class_groups`` that is neither a list nor a dict of class lists.
    """

    num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP
    class_groups: ClassGroups | None = None
    dataset_every_n_epochs: int = 0
    seed: int = 0
    prefix: str = PREFIX

    def __post_init__(self) -> None:
        check_int(self.num_bootstrap, "num_bootstrap", minimum=0)
        if self.num_bootstrap == 1:
            raise ValueError("`num_bootstrap` must be 0 (no intervals) or at least 2, got 1.")
        check_int(self.dataset_every_n_epochs, "dataset_every_n_epochs", minimum=0)
        check_class_groups(self.class_groups)

    def check_classes(self, num_classes: int) -> None:
        """Check ``class_groups`` against the data's classes, once they are known (when training starts).

        Raises:
            ValueError: when it does not place each of the ``num_classes`` classes in exactly one group.
        """
        if self.class_groups is not None:
            resolve_groups(self.class_groups, num_classes)

    @property
    def needs_matrices(self) -> bool:
        """Whether the probe must keep its whole stiffness matrices (intervals and groups are computed from them)."""
        return self.num_bootstrap > 0 or self.class_groups is not None

    def dataset_due(self, epoch: int) -> bool:
        """Whether the whole training set is measured at the end of ``epoch`` (0-based)."""
        return self.dataset_every_n_epochs > 0 and (epoch + 1) % self.dataset_every_n_epochs == 0

    def add(self, result: StiffnessResult) -> StiffnessResult:
        """Add the bootstrap intervals, the bands around its distance curves (the same draws) and the class-group
        measures to a probe's ``result`` (from its matrices)."""
        if self.num_bootstrap > 0 and result.has_stiffness:
            add_intervals(result, self.num_bootstrap, self.seed, self.prefix)
        if self.class_groups is not None and result.has_stiffness:
            add_group_measures(result, self.class_groups)
        return result

    def measure_dataset(self, callback: Any, trainer: Any, pl_module: nn.Module) -> DatasetResult | None:
        """At the end of a due epoch: the whole training set's class matrix (each process its shard, sums reduced),
        its scalars to every logger at the global step, and its raw file. A failure is skipped like a probe's."""
        epoch, step = trainer.current_epoch, trainer.global_step
        if callback._probes is None or not self.dataset_due(epoch):
            return None
        comm = Communicator.from_trainer(trainer)
        show_progress = trainer.progress_bar_callback is not None and trainer.is_global_zero
        started = time.perf_counter()
        try:
            with preserved_rng(pl_module.device), eval_mode(pl_module), torch.inference_mode(False):
                with progress_bar(show_progress, f"Stiffness over the training set (epoch {epoch})") as progress:
                    sums = comm.agreed(lambda: _local_sums(callback, trainer, pl_module, progress))
            matrix = class_sums_to_matrix(*(_reduced(comm, t) for t in sums))
        except Exception as err:  # like a failed probe: reported and skipped, training goes on
            callback._skip(err, is_expected(err), f"measuring the training set at epoch {epoch} was skipped")
            return None
        result = DatasetResult(epoch, step, matrix, time.perf_counter() - started)
        for logger in trainer.loggers:
            logger.log_metrics(result.scalars(self.prefix), step=step)
        if trainer.is_global_zero and callback.save_raw:
            result.save(callback._raw.directory)
        if trainer.is_global_zero and callback.log_images:
            names = callback._probes.class_names
            callback._images.write_specs(dataset_specs(matrix, names, epoch, step, self.prefix), epoch, step)
        return result


def _local_sums(callback: Any, trainer: Any, model: nn.Module, progress: Any) -> tuple[Tensor, Tensor]:
    options = callback._options
    to_xy, convert = callback._batch_to_xy or default_batch_to_xy, trainer.precision_plugin.convert_input

    def converted_xy(batch: Any) -> tuple[Any, Tensor]:  # inputs as training sees them (64-true, bf16-true, ...)
        x, y = to_xy(batch)
        return convert(x), y

    return dataset_class_sums(
        model, _first_loader(trainer.train_dataloader), callback._probes.num_classes, loss_fn=options.loss_fn,
        batch_to_xy=converted_xy, forward_fn=getattr(options, "forward_fn", None), method=options.method,
        chunk_size=options.chunk_size, progress=progress,
    )  # fmt: skip


def _reduced(comm: Communicator, tensor: Tensor) -> Tensor:
    return tensor if comm.world_size == 1 else comm.strategy.reduce(tensor, reduce_op="sum")


def _first_loader(loaders: Any) -> Any:
    """The first DataLoader of what ``trainer.train_dataloader`` holds (a loader, a CombinedLoader, a list, a dict)."""
    if hasattr(loaders, "flattened"):
        loaders = loaders.flattened
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return _first_loader(loaders[0])
    return loaders
