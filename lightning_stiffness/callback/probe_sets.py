"""Probe sets: the fixed examples whose gradients a probe compares, drawn once, stratified by class.

The probe examples of all sets are batched together with the training dataloader's own ``collate_fn`` (so padding
collates pad them to one length; the callback's ``probe_collate_fn`` instead, when given), then turned into
``(x, y)`` by :func:`~lightning_stiffness.measures.batches.default_batch_to_xy` (tuples, lists, dicts) or a user's
``batch_to_xy``, exactly as a training batch would be. ``x`` may be a tensor, a tuple or a dict of tensors with the
examples along dim 0 (:mod:`lightning_stiffness.gram.inputs`). Sampling uses only the generator it is given, never
the global random state. Pure PyTorch: the callback finds the datasets (:func:`find_datasets`) and their
``collate_fn`` (:func:`find_collate_fn`), and :func:`build_probe_sets` draws each probe set or restores it from a
checkpoint's indices.

The collate is run more than once on the same probe examples, under other random seeds: a collate whose batch
changes (mixup, CutMix, random augmentation) would make every probe measure other blends of the examples, with
validation examples mixed into training ones, so it is refused (:func:`collate_probe_sets`). A collate that mixes
deterministically cannot be told from one that does not.
"""

import random
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from lightning_stiffness.callback.isolation import preserved_rng
from lightning_stiffness.exceptions import ProbeDataError
from lightning_stiffness.gram.inputs import Inputs, num_examples, take
from lightning_stiffness.measures.batches import default_batch_to_xy

BatchToXY = Callable[[Any], tuple[Any, Any]]
Collate = Callable[[list[Any]], Any]
#: Items collated at a time when labels must be read from the items themselves.
LABEL_CHUNK = 256
#: Seeds of the extra collates that tell a random collate: four, so that one applying its augmentation to half the
#: batches (``p=0.5``) escapes with probability 1/16 at most, on every example at once.
RECOLLATE_SEEDS = (1, 2, 3, 4)


def _label_value(y: Any, where: str) -> int:
    if isinstance(y, Tensor):
        if y.numel() != 1:
            raise ProbeDataError(
                f"{where}: expected one class label per example, got a tensor of shape {tuple(y.shape)}."
            )
        if y.is_floating_point() or y.is_complex():
            raise ProbeDataError(
                f"{where}: labels are floating point ({y.dtype}); stiffness by class needs integer class labels "
                "(regression targets are not supported)."
            )
        return int(y.item())
    if isinstance(y, bool) or not isinstance(y, int):
        kind = "floating point" if isinstance(y, float) else type(y).__name__
        raise ProbeDataError(
            f"{where}: labels are {kind}; stiffness by class needs integer class labels "
            "(regression targets are not supported)."
        )
    return y


def _checked_labels(labels: Tensor, where: str) -> Tensor:
    if len(labels):
        _label_value(labels[:1], where)
    return labels.long()


def dataset_labels(
    dataset: Dataset,
    batch_to_xy: BatchToXY | None = None,
    where: str = "dataset",
    collate_fn: Collate | None = None,
) -> Tensor:
    """The class label of every item, as a long tensor.

    Uses ``TensorDataset`` tensors or a ``targets`` attribute (torchvision's datasets) when items are read with the
    default layout; otherwise reads every item once, :data:`LABEL_CHUNK` at a time through ``collate_fn`` and
    ``batch_to_xy``, as training batches are read.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ProbeDataError(f"{where}: StiffnessCallback needs a map-style dataset (with __len__ and __getitem__).")
    if batch_to_xy is None:
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
            labels = dataset.tensors[1]
            if labels.dim() == 1:
                return _checked_labels(labels, where)
        if isinstance(dataset, Subset):
            inner = dataset_labels(dataset.dataset, None, where, collate_fn)
            return inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
        targets = getattr(dataset, "targets", None)
        if isinstance(targets, (Tensor, list)) and len(targets) == len(dataset):
            labels = torch.as_tensor(targets)
            if labels.dim() == 1:
                return _checked_labels(labels, where)
    chunks = [
        _batch_labels(dataset, range(start, min(len(dataset), start + LABEL_CHUNK)), collate_fn, batch_to_xy, where)
        for start in range(0, len(dataset), LABEL_CHUNK)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)


def _batch_labels(dataset: Dataset, indices, collate_fn: Collate | None, batch_to_xy, where: str) -> Tensor:
    return _labels_of(_collated_xy([dataset[i] for i in indices], collate_fn, batch_to_xy)[1], len(indices), where)


def _collated_xy(items: list[Any], collate_fn: Collate | None, batch_to_xy: BatchToXY | None) -> tuple[Any, Any]:
    return (batch_to_xy or default_batch_to_xy)((collate_fn or default_collate)(items))


def _labels_of(y: Any, count: int, where: str) -> Tensor:
    """``y`` of a collated batch as ``count`` integer class labels."""
    labels = torch.as_tensor(y) if not isinstance(y, Tensor) else y
    if labels.dim() != 1 or labels.shape[0] != count:
        soft = labels.dim() == 2 and labels.shape[0] == count and labels.is_floating_point()
        hint = (
            " These look like soft labels, which a collate_fn that mixes examples (mixup, CutMix) makes: pass "
            "`probe_collate_fn` (for example torch.utils.data.default_collate) to batch the probe examples unmixed."
        )
        raise ProbeDataError(
            f"{where}: expected one class label per example ({count}), got labels of shape {tuple(labels.shape)}."
            + (hint if soft else "")
        )
    return _checked_labels(labels, where)


def stratified_indices(
    labels: Tensor, samples_per_class: int, generator: torch.Generator
) -> tuple[Tensor, dict[int, int]]:
    """Up to ``samples_per_class`` random indices of each class present, sorted; and the classes that had fewer.

    Returns:
        ``(indices, short)`` where ``short`` maps a class to the number of examples it had, when under the request.
    """
    chosen, short = [], {}
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        order = torch.randperm(members.numel(), generator=generator)
        chosen.append(members[order[:samples_per_class]])
        if members.numel() < samples_per_class:
            short[int(cls)] = int(members.numel())
    return torch.sort(torch.cat(chosen)).values, short


@dataclass
class ProbeSet:
    """Fixed probe examples: dataset indices, the batched inputs (a tensor, tuple or dict of tensors along dim 0)
    and labels."""

    indices: Tensor
    inputs: Inputs
    labels: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def collate_probe_sets(
    datasets: dict[str, Dataset],
    indices: dict[str, Tensor],
    collate_fn: Collate | None = None,
    batch_to_xy: BatchToXY | None = None,
    collate_name: str | None = None,
) -> dict[str, ProbeSet]:
    """The items at ``indices`` of each dataset, batched together by ``collate_fn`` and split back into probe sets.

    One batch for all sets, so that a padding ``collate_fn`` pads every probe example to the same length.

    Args:
        collate_name: what ``collate_fn`` is called in messages; default the training dataloader's.

    Raises:
        ProbeDataError: when the batch's ``x`` is not a tensor, tuple or dict of tensors holding every example along
            dim 0 (the message names the entry), its ``y`` is not one integer label per example, or collating the
            same items again under other random seeds gives another batch (a random collate).
    """
    items = [datasets[name][i] for name in indices for i in indices[name].tolist()]
    where = collate_name or "the training dataloader's `collate_fn`"
    x, y = _collated_xy(items, collate_fn, batch_to_xy)
    _check_deterministic(items, collate_fn, batch_to_xy, (x, y), where)
    try:
        count = num_examples(x, "x")
    except ValueError as err:
        raise ProbeDataError(f"the probe examples' batch (from `collate_fn` and `batch_to_xy`): {err}") from err
    if count != len(items):
        raise ProbeDataError(f"the probe examples' batch holds {count} examples along dim 0 for {len(items)} items.")
    labels = _labels_of(y, len(items), f"the probe examples' batch (from {where})")
    sets, start = {}, 0
    for name, chosen in indices.items():
        span = slice(start, start + len(chosen))
        sets[name] = ProbeSet(indices=chosen.clone(), inputs=take(x, span), labels=labels[span])
        start = span.stop
    return sets


def _check_deterministic(
    items: list[Any], collate_fn: Collate | None, batch_to_xy: BatchToXY | None, first: tuple[Any, Any], where: str
) -> None:
    """Collate ``items`` again under each of :data:`RECOLLATE_SEEDS`; refuse a collate whose batch changes. The
    random states are restored after."""
    for seed in RECOLLATE_SEEDS:
        with preserved_rng(torch.device("cpu")):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            again = _collated_xy(items, collate_fn, batch_to_xy)
        if not _same(first, again):
            raise ProbeDataError(
                f"{where} is random: collating the same probe examples again gave another batch. A collate that mixes "
                "or augments examples (mixup, CutMix, random crops) would make every probe measure other blends, "
                "with validation examples mixed into training ones. Pass `probe_collate_fn` to StiffnessCallback "
                "(for example torch.utils.data.default_collate, or your padding collate without the augmentation)."
            )


def _same(a: Any, b: Any) -> bool:
    """Whether two collated ``(x, y)`` are equal: the same structure, and tensors equal bit for bit (NaN to NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a, b) or bool(
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def with_collate(loader: Any, collate_fn: Collate | None) -> Any:
    """``loader`` itself, or, with ``collate_fn``, a DataLoader over its dataset with its sampler (the distributed
    one under DDP) and batch size that batches with ``collate_fn`` (no worker processes)."""
    if collate_fn is None:
        return loader
    if getattr(loader, "batch_size", None) is None:  # a loader with its own batch sampler
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=collate_fn)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, collate_fn=collate_fn)


def find_datasets(loaders: Any) -> list[Any]:
    """The datasets of the dataloaders in ``loaders`` (a loader, or a dict, list or tuple of them), in order."""
    if hasattr(loaders, "dataset"):
        return [loaders.dataset]
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [dataset for loader in loaders for dataset in find_datasets(loader)]
    return []


def first_loader(loaders: Any) -> Any:
    """The first DataLoader of what ``trainer.train_dataloader`` holds (a loader, a CombinedLoader, a list, a dict)."""
    if hasattr(loaders, "flattened"):
        loaders = loaders.flattened
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return first_loader(loaders[0])
    return loaders


def find_collate_fn(loaders: Any) -> Collate | None:
    """The ``collate_fn`` of the first dataloader in ``loaders`` (a loader, or a dict, list or tuple of them)."""
    if hasattr(loaders, "dataset"):
        return getattr(loaders, "collate_fn", None)
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return next((fn for loader in loaders if (fn := find_collate_fn(loader)) is not None), None)
    return None


def draw_indices(
    dataset: Dataset,
    samples_per_class: int,
    generator: torch.Generator,
    labels_of: Callable[[Dataset, str], Tensor],
    where: str = "dataset",
) -> tuple[Tensor, dict[int, int]]:
    """Stratified probe indices of ``dataset``, and the classes that had fewer than ``samples_per_class`` examples.

    Raises:
        ProbeDataError: for an empty dataset, negative or non-integer labels, or items without labels.
    """
    labels = labels_of(dataset, where)
    if labels.numel() == 0:
        raise ProbeDataError(f"{where} is empty.")
    if int(labels.min()) < 0:
        raise ProbeDataError(f"{where} has negative labels; class labels must be 0, 1, 2, ...")
    return stratified_indices(labels, samples_per_class, generator)


def _checked_restore(dataset: Dataset, indices: Tensor, where: str) -> Tensor:
    """The probe indices saved in a checkpoint, checked against the dataset's size."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if len(indices) == 0:
        return indices
    if not isinstance(dataset, Sized):  # as `dataset_labels` says for a dataset to draw from
        raise ProbeDataError(f"{where}: StiffnessCallback needs a map-style dataset (with __len__ and __getitem__).")
    if int(indices.max()) >= len(dataset):
        raise ProbeDataError(f"{where} has {len(dataset)} items, fewer than the checkpoint's probe indices need.")
    return indices


#: How probe sets are named in messages.
SET_WORDS = {"train": "training", "val": "validation"}


@dataclass
class ProbeSets:
    """The probe sets of a run (``"train"``, optionally ``"val"``), the number of classes and their names."""

    sets: dict[str, ProbeSet]
    num_classes: int
    class_names: list[str]


def build_probe_sets(
    datasets: dict[str, Dataset],
    samples_per_class: int,
    seed: int,
    *,
    batch_to_xy: BatchToXY | None = None,
    collate_fn: Collate | None = None,
    restored: dict[str, Tensor] | None = None,
    broadcast: Callable[[Tensor], Tensor] = lambda indices: indices,
    class_names: Sequence[str] | None = None,
    collate_name: str | None = None,
) -> tuple[ProbeSets, dict[str, dict[int, int]]]:
    """Draw (or restore) a probe set from each dataset with one ``torch.Generator(seed)``, in the order given.

    Args:
        datasets: probe set name -> dataset.
        samples_per_class: examples per class.
        seed: seed of the generator that draws them.
        batch_to_xy: collated batch -> ``(x, y)``; default :func:`default_batch_to_xy`.
        collate_fn: batches items, as the training dataloader does; default ``torch.utils.data.default_collate``.
        collate_name: what ``collate_fn`` is called in messages; default the training dataloader's.
        restored: probe set name -> indices saved in a checkpoint, used instead of a draw.
        broadcast: makes every process use rank 0's draw (under DDP).
        class_names: names given by the user; default: the first dataset's ``classes`` attribute, or the labels.

    Returns:
        The probe sets, and per drawn set the classes that had fewer examples than asked (class -> count).

    Raises:
        ProbeDataError: for data that cannot be probed, or fewer ``class_names`` than classes.
    """
    generator = torch.Generator().manual_seed(seed)
    indices, short = {}, {}
    for name, dataset in datasets.items():
        where = f"the {SET_WORDS[name]} dataset"
        if restored and name in restored:
            indices[name] = _checked_restore(dataset, restored[name], where)
        else:
            drawn, short[name] = draw_indices(
                dataset,
                samples_per_class,
                generator,
                lambda data, at: dataset_labels(data, batch_to_xy, at, collate_fn),
                where,
            )
            indices[name] = broadcast(drawn)
    sets = collate_probe_sets(datasets, indices, collate_fn, batch_to_xy, collate_name)
    num_classes = max(int(p.labels.max()) + 1 for p in sets.values())
    names = _class_names(class_names, next(iter(datasets.values())), num_classes)
    return ProbeSets(sets, num_classes, names), {name: s for name, s in short.items() if s}


def _class_names(given: Sequence[str] | None, dataset: Dataset, num_classes: int) -> list[str]:
    """The user's names, or the dataset's ``classes``, or the labels, for ``num_classes`` classes."""
    if given is not None:
        if len(given) < num_classes:
            raise ProbeDataError(f"`class_names` names {len(given)} classes but the labels go up to {num_classes - 1}.")
        return [str(name) for name in given[:num_classes]]
    found = getattr(dataset, "classes", None)
    if isinstance(found, (list, tuple)) and len(found) >= num_classes:
        return [str(name) for name in found[:num_classes]]
    return [str(label) for label in range(num_classes)]
