"""Brute-force float64 references: one ``torch.autograd.grad`` per example, nothing shared with the engines."""

from collections.abc import Callable

import torch
from torch import Tensor, nn


def _count(inputs: Tensor | dict[str, Tensor]) -> int:
    return next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]


def _forward(model: nn.Module, inputs: Tensor | dict[str, Tensor], i: int) -> Tensor:
    """The model on example ``i`` alone: a dict of tensors is sliced per key and passed as keywords."""
    if isinstance(inputs, dict):
        return model(**{key: value[i : i + 1] for key, value in inputs.items()})
    return model(inputs[i : i + 1])


def reference_gradients(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable | None = None, params=None
) -> Tensor:
    """Per-example gradients [N, P] of each example's own loss, one backward pass per example, in float64."""
    loss_fn = loss_fn or (lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    named = dict(model.named_parameters())
    chosen = [p for name, p in named.items() if (params is None and p.requires_grad) or (params and name in params)]
    flags = [p.requires_grad for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    rows = []
    for i in range(_count(inputs)):
        loss = loss_fn(_forward(model, inputs, i), targets[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, chosen, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, chosen, strict=True)]
            )
        )
    for p, flag in zip(chosen, flags, strict=True):
        p.requires_grad_(flag)
    return torch.stack(rows).double()


def reference_gram(model, inputs, targets, inputs2=None, targets2=None, loss_fn=None, params=None) -> Tensor:
    rows = reference_gradients(model, inputs, targets, loss_fn, params)
    cols = rows if inputs2 is None else reference_gradients(model, inputs2, targets2, loss_fn, params)
    return rows @ cols.T
