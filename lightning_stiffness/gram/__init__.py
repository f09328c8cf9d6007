"""The Gram matrix of per-example loss gradients, G[i, j] = <g_i, g'_j>.

:func:`gradient_gram` checks its arguments and hands the work to an engine:

- ``"torch.func"``: ``vmap(grad(...))`` over ``functional_call``, exact for any model (:mod:`.torchfunc`).
- ``"auto"``: the fastest exact engine available for the model.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_stiffness.gram.torchfunc import Progress, torchfunc_gram
from lightning_stiffness.gram.validation import (
    LossFn,
    check_examples,
    check_loss_fn,
    check_model_mode,
    default_loss_fn,
    floating_dtype,
    select_parameters,
)

#: The values ``method`` accepts.
METHODS = ("auto", "torch.func")

__all__ = ["METHODS", "gradient_gram"]


def gradient_gram(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    inputs2: Tensor | None = None,
    targets2: Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    progress: Progress = None,
) -> Tensor:
    r"""Gram matrix of per-example loss gradients.

    .. math::
        G_{ij} = \langle \nabla_\theta \ell(f(x_i), y_i),\ \nabla_\theta \ell(f(x'_j), y'_j) \rangle

    where :math:`\ell` is each example's own loss (Fort et al., "Stiffness: A New Perspective on Generalization in
    Neural Networks", arXiv 1901.09491). Cosine and sign stiffness follow from it
    (:func:`~lightning_stiffness.functional.cosine_stiffness`, :func:`~lightning_stiffness.functional.sign_stiffness`).

    The model is evaluated as given: the caller picks ``model.eval()`` or train mode. A model with BatchNorm or
    dropout in training mode is refused with a ``ValueError`` asking for ``model.eval()``, because those layers
    couple the examples of a batch (or draw random masks) and per-example gradients are then not defined.
    The model is left exactly as it was: parameters, buffers, ``requires_grad`` flags and ``.grad``.

    Args:
        model: the network; ``model(inputs)`` must give the outputs ``loss_fn`` takes.
        inputs: examples, one per row (any tensor the model takes: images, features, token ids).
        targets: one target per example.
        inputs2: a second set of examples for a cross Gram matrix [N, M]; ``None`` for the square Gram of ``inputs``.
        targets2: targets of ``inputs2``.
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses of shape [N]. Default: cross-entropy
            with ``reduction="none"``.
        params: names (as in ``model.named_parameters()``) of the parameters to differentiate. Default: every
            parameter with ``requires_grad=True``.
        method: ``"auto"`` or ``"torch.func"`` (see the module docstring).
        chunk_size: examples per block of per-example gradients; bounds memory. Default: chosen from a memory budget
            of 2 GiB for the blocks held at once.
        progress: called as ``progress(done, total)`` after each block of the Gram matrix.

    Returns:
        A tensor [N, M] (M = N when ``inputs2`` is None) on the model's device, in the floating dtype of the
        differentiated parameters.

    Raises:
        ValueError: for an unknown ``method``; empty inputs or mismatched lengths; a ``loss_fn`` that does not return
            one loss per example; a ``params`` name the model does not have; a model with no trainable parameters;
            BatchNorm or dropout in training mode.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_stiffness.functional import gradient_gram
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> gradient_gram(model, x, y).shape
        torch.Size([5, 5])
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
    check_examples(inputs, targets, "inputs", "targets")
    if (inputs2 is None) != (targets2 is None):
        raise ValueError("`inputs2` and `targets2` must be given together (both or neither).")
    if inputs2 is not None:
        check_examples(inputs2, targets2, "inputs2", "targets2")
    check_model_mode(model)
    chosen = select_parameters(model, params)
    dtype = floating_dtype(chosen)
    loss_fn = loss_fn or default_loss_fn

    device = next(iter(chosen.values())).device
    inputs, targets = inputs.to(device), targets.to(device)
    if inputs2 is not None:
        inputs2, targets2 = inputs2.to(device), targets2.to(device)
    check_loss_fn(model, loss_fn, inputs, targets)

    # Both engines are plain functions of the parameters: no .grad is written, nothing in the model changes.
    with torch.enable_grad():
        return torchfunc_gram(
            model,
            loss_fn,
            chosen,
            inputs,
            targets,
            inputs2,
            targets2,
            chunk_size=chunk_size,
            dtype=dtype,
            progress=progress,
        )
