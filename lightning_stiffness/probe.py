"""Probe sets: the fixed examples whose gradients a probe compares, drawn once, stratified by class.

Items of a map-style dataset are turned into ``(x, y)`` by :func:`default_batch_to_xy` (tuples, lists, dicts) or a
user's ``batch_to_xy``. Sampling uses only the generator it is given, never the global random state. Pure PyTorch:
the callback finds the datasets (:func:`find_datasets`), draws each probe set (:func:`draw_probe_set`) or restores it
from a checkpoint's indices (:func:`restore_probe_set`).
"""

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

BatchToXY = Callable[[Any], tuple[Any, Any]]

#: Keys looked for, in this order, when a dataset item is a dict.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "input_ids")
TARGET_KEYS = ("y", "label", "labels", "target", "targets")


class ProbeDataError(ValueError):
    """The data cannot be probed: no labels, non-integer labels, an unreadable item layout."""


def default_batch_to_xy(item: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a dataset item: the first two entries of a tuple or list, or a dict's input and target keys.

    Dict keys looked for: inputs under one of ``INPUT_KEYS`` (``x``, ``input``, ``inputs``, ``image``, ``images``,
    ``features``, ``input_ids``), targets under one of ``TARGET_KEYS`` (``y``, ``label``, ``labels``, ``target``,
    ``targets``).
    """
    if isinstance(item, Mapping):
        x_key = next((k for k in INPUT_KEYS if k in item), None)
        y_key = next((k for k in TARGET_KEYS if k in item), None)
        if x_key is None or y_key is None:
            raise ProbeDataError(
                f"a dataset item is a dict with keys {sorted(map(str, item))}; expected an input key among {INPUT_KEYS}"
                f" and a label key among {TARGET_KEYS}. Pass `batch_to_xy` to StiffnessCallback for other layouts."
            )
        return item[x_key], item[y_key]
    if isinstance(item, Sequence) and not isinstance(item, str) and len(item) >= 2:
        return item[0], item[1]
    raise ProbeDataError(
        f"a dataset item of type {type(item).__name__} has no label: expected an (x, y) tuple or list, or a dict. "
        "Pass `batch_to_xy` to StiffnessCallback for other layouts."
    )


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


def dataset_labels(dataset: Dataset, batch_to_xy: BatchToXY | None = None, where: str = "dataset") -> Tensor:
    """The class label of every item, as a long tensor.

    Uses ``TensorDataset`` tensors or a ``targets`` attribute (torchvision's datasets) when items are read with the
    default layout; otherwise reads every item once.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ProbeDataError(f"{where}: StiffnessCallback needs a map-style dataset (with __len__ and __getitem__).")
    if batch_to_xy is None:
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
            labels = dataset.tensors[1]
            if labels.dim() == 1:
                return _checked_labels(labels, where)
        if isinstance(dataset, Subset):
            return dataset_labels(dataset.dataset, None, where)[torch.as_tensor(dataset.indices, dtype=torch.long)]
        targets = getattr(dataset, "targets", None)
        if isinstance(targets, (Tensor, list)) and len(targets) == len(dataset):
            labels = torch.as_tensor(targets)
            if labels.dim() == 1:
                return _checked_labels(labels, where)
    to_xy = batch_to_xy or default_batch_to_xy
    return torch.tensor([_label_value(to_xy(dataset[i])[1], where) for i in range(len(dataset))], dtype=torch.long)


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
    """Fixed probe examples: dataset indices, stacked inputs and labels."""

    indices: Tensor
    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def gather(dataset: Dataset, indices: Tensor, batch_to_xy: BatchToXY | None = None, where: str = "dataset") -> ProbeSet:
    """Read the items at ``indices`` and stack them into a :class:`ProbeSet`."""
    to_xy = batch_to_xy or default_batch_to_xy
    xs, ys = [], []
    for i in indices.tolist():
        x, y = to_xy(dataset[i])
        xs.append(torch.as_tensor(x))
        ys.append(_label_value(y, where))
    return ProbeSet(indices=indices.clone(), inputs=torch.stack(xs), labels=torch.tensor(ys, dtype=torch.long))


def find_datasets(loaders: Any) -> list[Any]:
    """The datasets of the dataloaders in ``loaders`` (a loader, or a dict, list or tuple of them), in order."""
    if hasattr(loaders, "dataset"):
        return [loaders.dataset]
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [dataset for loader in loaders for dataset in find_datasets(loader)]
    return []


def draw_probe_set(
    dataset: Dataset,
    samples_per_class: int,
    generator: torch.Generator,
    batch_to_xy: BatchToXY | None = None,
    where: str = "dataset",
    broadcast: Callable[[Tensor], Tensor] = lambda indices: indices,
) -> tuple[ProbeSet, dict[int, int]]:
    """A stratified probe set of ``dataset``, and the classes that had fewer than ``samples_per_class`` examples.

    Args:
        dataset: a map-style dataset with integer class labels.
        samples_per_class: examples drawn per class (all of a class that has fewer).
        generator: the only source of randomness.
        batch_to_xy: item -> ``(x, y)``; default :func:`default_batch_to_xy`.
        where: names the dataset in error messages.
        broadcast: makes every process use rank 0's draw (under DDP).

    Raises:
        ProbeDataError: for an empty dataset, negative or non-integer labels, or items without labels.
    """
    labels = dataset_labels(dataset, batch_to_xy, where)
    if labels.numel() == 0:
        raise ProbeDataError(f"{where} is empty.")
    if int(labels.min()) < 0:
        raise ProbeDataError(f"{where} has negative labels; class labels must be 0, 1, 2, ...")
    indices, short = stratified_indices(labels, samples_per_class, generator)
    return gather(dataset, broadcast(indices), batch_to_xy, where), short


def restore_probe_set(
    dataset: Dataset, indices: Tensor, batch_to_xy: BatchToXY | None = None, where: str = "dataset"
) -> ProbeSet:
    """The probe set at ``indices`` saved in a checkpoint.

    Raises:
        ProbeDataError: when the dataset is too small for the indices.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    if len(indices) and int(indices.max()) >= len(dataset):
        raise ProbeDataError(f"{where} has {len(dataset)} items, fewer than the checkpoint's probe indices need.")
    return gather(dataset, indices, batch_to_xy, where)


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
    restored: dict[str, Tensor] | None = None,
    broadcast: Callable[[Tensor], Tensor] = lambda indices: indices,
    class_names: Sequence[str] | None = None,
) -> tuple[ProbeSets, dict[str, dict[int, int]]]:
    """Draw (or restore) a probe set from each dataset with one ``torch.Generator(seed)``, in the order given.

    Args:
        datasets: probe set name -> dataset.
        samples_per_class: examples per class.
        seed: seed of the generator that draws them.
        batch_to_xy: item -> ``(x, y)``.
        restored: probe set name -> indices saved in a checkpoint, used instead of a draw.
        broadcast: makes every process use rank 0's draw (under DDP).
        class_names: names given by the user; default: the first dataset's ``classes`` attribute, or the labels.

    Returns:
        The probe sets, and per drawn set the classes that had fewer examples than asked (class -> count).

    Raises:
        ProbeDataError: for data that cannot be probed, or fewer ``class_names`` than classes.
    """
    generator = torch.Generator().manual_seed(seed)
    sets, short = {}, {}
    for name, dataset in datasets.items():
        where = f"the {SET_WORDS[name]} dataset"
        if restored and name in restored:
            sets[name] = restore_probe_set(dataset, restored[name], batch_to_xy, where)
        else:
            sets[name], short[name] = draw_probe_set(
                dataset, samples_per_class, generator, batch_to_xy, where, broadcast
            )
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
