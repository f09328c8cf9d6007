"""Probe sets: the fixed examples whose gradients a probe compares, drawn once, stratified by class.

Items of a map-style dataset are turned into ``(x, y)`` by :func:`default_batch_to_xy` (tuples, lists, dicts) or a
user's ``batch_to_xy``. Sampling uses only the generator it is given, never the global random state.
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
