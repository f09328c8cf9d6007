"""Examples as the model takes them, and the forward that takes them.

``inputs`` may be a tensor (``model(x)``), a tuple or list of tensors (positional arguments, ``model(*x)``) or a dict
of tensors (keyword arguments, ``model(**x)``: ``input_ids``, ``attention_mask``, ...), with the examples along dim 0
of every tensor. The engines slice them per example and per chunk with :func:`take`. ``forward_fn(module, x)``
replaces the default call (a LightningModule without ``forward``, a model that needs extra arguments).
"""

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

#: A tensor, a tuple/list of tensors, or a dict of tensors, the examples along dim 0 of each.
Inputs = Tensor | tuple | list | dict
#: ``forward_fn(module, x) -> outputs``.
ForwardFn = Callable[[nn.Module, Any], Any]


def _leaves(x: Inputs, name: str) -> list[tuple[str, Any]]:
    if isinstance(x, dict):
        return [(f"{name}[{key!r}]", value) for key, value in x.items()]
    if isinstance(x, tuple | list):
        return [(f"{name}[{i}]", value) for i, value in enumerate(x)]
    return [(name, x)]


def tensors(x: Inputs) -> list[Any]:
    """The entries of ``x`` in order: the tensor itself, a tuple's or list's items, or a dict's values."""
    return [value for _, value in _leaves(x, "")]


def num_examples(x: Inputs, name: str = "inputs") -> int:
    """The number of examples in ``x``, checked to be the same along dim 0 of every tensor.

    Raises:
        ValueError: naming the entry, for an entry that is not a tensor, a tensor without dim 0, no entry at all,
            or tensors with different numbers of rows.
    """
    leaves = _leaves(x, name)
    if not leaves:
        raise ValueError(f"`{name}` must hold at least one tensor of examples, got an empty {type(x).__name__}.")
    count = None
    for where, value in leaves:
        if not isinstance(value, Tensor):
            raise ValueError(
                f"`{where}` must be a tensor with one example per row along dim 0 (a tensor, a tuple of tensors or a "
                f"dict of tensors), got {type(value).__name__}."
            )
        if value.dim() == 0:
            raise ValueError(f"`{where}` must have the examples along dim 0, got a 0-dimensional tensor.")
        if count is None:
            count, first = value.shape[0], where
        elif value.shape[0] != count:
            raise ValueError(
                f"`{where}` has {value.shape[0]} rows along dim 0 but `{first}` has {count}: every tensor of "
                f"`{name}` must hold the same examples along dim 0 (shape {tuple(value.shape)})."
            )
    assert count is not None  # there is at least one leaf, and each is a tensor with dim 0
    return count


def take(x: Inputs, index: slice | Tensor) -> Inputs:
    """The examples ``index`` of ``x``, in the same structure."""
    if isinstance(x, dict):
        return {key: value[index] for key, value in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(value[index] for value in x)
    return x[index]


def concat(parts: list[Inputs]) -> Inputs:
    """The examples of ``parts`` (inputs of the same structure and shapes but dim 0) one after the other."""
    first = parts[0]
    if isinstance(first, dict):
        return {key: torch.cat([part[key] for part in parts]) for key in first}
    if isinstance(first, tuple | list):
        return type(first)(torch.cat([part[i] for part in parts]) for i in range(len(first)))
    return torch.cat(cast(list[Tensor], parts))


def apply(x: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """``fn`` applied to every tensor of ``x``, in the same structure."""
    if isinstance(x, dict):
        return {key: fn(value) for key, value in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(fn(value) for value in x)
    return fn(x)


def default_forward(module: nn.Module, x: Inputs) -> Any:
    """``module(x)``, ``module(*x)`` or ``module(**x)`` by the structure of ``x``."""
    if isinstance(x, dict):
        return module(**x)
    if isinstance(x, tuple | list):
        return module(*x)
    return module(x)


class Forward(nn.Module):
    """``forward_fn(model, x)`` as a module, so that ``functional_call`` can run it with the model's parameters
    (prefixed ``model.``) replaced."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn or default_forward

    def forward(self, x: Inputs) -> Any:
        return self.forward_fn(self.model, x)


def floating_point(x: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating tensors of ``x`` in ``dtype`` (token ids and masks as they are)."""
    return apply(x, lambda t: t.to(dtype) if t.is_floating_point() else t)
