"""Brute-force float64 references: one ``torch.autograd.grad`` per example, nothing shared with the engines.

Every test that checks a number against per-example gradients takes them from here, so the suite has one definition
of "example i's own gradient": the model on example ``i`` alone (a tensor, a dict of tensors or a tuple sliced at
``i``), its loss summed, differentiated with respect to the chosen parameters; a parameter the loss does not reach
gets zeros.
"""

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """The suite's default per-example loss: cross-entropy with ``reduction="none"``."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def take(inputs: Any, i: int) -> Any:
    """Example ``i`` of ``inputs`` (a tensor, a dict of tensors, or a tuple/list of tensors), batch dim kept."""
    if isinstance(inputs, dict):
        return {key: value[i : i + 1] for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(value[i : i + 1] for value in inputs)
    return inputs[i : i + 1]


def call(model: nn.Module, inputs: Any, forward_fn: Callable | None = None) -> Any:
    """``forward_fn(model, inputs)``, else the model on ``inputs``: a dict as keywords, a tuple as positionals."""
    if forward_fn is not None:
        return forward_fn(model, inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def to_float64(inputs: Any) -> Any:
    """``inputs`` with every floating tensor in float64 (integer ids and masks unchanged)."""
    if isinstance(inputs, dict):
        return {key: to_float64(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_float64(value) for value in inputs)
    return inputs.double() if inputs.is_floating_point() else inputs


def per_example_gradients(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable | None = None,
    params: Any = None,
    forward_fn: Callable | None = None,
    before_each: Callable[[], None] | None = None,
    float64_copy: bool = False,
) -> dict[str, Tensor]:
    """Parameter name -> [N, numel] float64 gradients of each example's own loss, one backward pass per example.

    Args:
        params: parameter names to differentiate; ``None`` means every parameter with ``requires_grad``.
        before_each: called before each example (and once after the last), e.g. to restore buffers a forward updates.
        float64_copy: compute on a float64 copy of the model in eval mode, with the inputs' floats in float64, instead
            of on the model as it is (its dtype, its mode) with the gradients cast to float64 after.
    """
    loss_fn = loss_fn or cross_entropy
    if float64_copy:
        model, inputs = copy.deepcopy(model).double().eval(), to_float64(inputs)
    named = dict(model.named_parameters())
    names = [name for name, p in named.items() if (p.requires_grad if params is None else name in params)]
    chosen = [named[name] for name in names]
    flags = [p.requires_grad for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    try:
        for i in range(targets.shape[0]):
            if before_each is not None:
                before_each()
            loss = loss_fn(call(model, take(inputs, i), forward_fn), targets[i : i + 1]).sum()
            grads = torch.autograd.grad(loss, chosen, allow_unused=True)
            for name, g, p in zip(names, grads, chosen, strict=True):
                rows[name].append((torch.zeros_like(p) if g is None else g).detach().double().flatten())
    finally:
        for p, flag in zip(chosen, flags, strict=True):
            p.requires_grad_(flag)
        if before_each is not None:
            before_each()
    return {name: torch.stack(r) for name, r in rows.items()}


def reference_gradients(model: nn.Module, inputs: Any, targets: Tensor, loss_fn=None, params=None, **kwargs) -> Tensor:
    """Per-example gradients [N, P] in float64 (the chosen parameters' in ``named_parameters`` order, flattened).

    Keywords as :func:`per_example_gradients`.
    """
    return torch.cat(list(per_example_gradients(model, inputs, targets, loss_fn, params, **kwargs).values()), dim=1)


def reference_gram(
    model, inputs, targets, inputs2=None, targets2=None, loss_fn=None, params=None, per_layer=False, **kwargs
) -> Any:
    """Float64 Gram [N, M] of the per-example gradients of two sets (the first with itself without ``inputs2``).

    With ``per_layer``, a dict module name -> [N, M] block (each module's own parameters). Keywords as
    :func:`per_example_gradients`.
    """
    rows = per_example_gradients(model, inputs, targets, loss_fn, params, **kwargs)
    cols = rows if inputs2 is None else per_example_gradients(model, inputs2, targets2, loss_fn, params, **kwargs)
    blocks: dict[str, Tensor] = {}
    for name in rows:
        key = name.rpartition(".")[0] or name
        block = rows[name] @ cols[name].T
        blocks[key] = block if key not in blocks else blocks[key] + block
    if per_layer:
        return blocks
    if not blocks:
        return torch.zeros(targets.shape[0], (targets if targets2 is None else targets2).shape[0], dtype=torch.float64)
    return sum(blocks.values())
