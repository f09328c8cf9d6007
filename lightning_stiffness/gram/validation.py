"""Argument checks shared by the Gram engines and by the rest of the package (the functional measures, the metrics,
the callback, which turns them into ``MisconfigurationException``).

Every check raises ``ValueError`` naming the argument and what was expected, so that a wrong call fails at once
with a message the caller can act on instead of producing a silently wrong Gram matrix. This module imports nothing
of the package outside :mod:`lightning_stiffness.gram`, so the engines stay self-contained.
"""

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stiffness.gram.inputs import Inputs, num_examples, take

LossFn = Callable[[Tensor, Tensor], Tensor]

# Modules whose output for one example depends on the other examples of the batch, or on random draws, when the
# module is in training mode. Per-example gradients are not defined for them, so we refuse instead of guessing.
_TRAIN_MODE_COUPLED = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.AlphaDropout)


def check_int(value: Any, name: str, minimum: int = 1, alternative: str = "") -> int:
    """``value`` when it is an integer (not a bool) of at least ``minimum``.

    Args:
        value: the argument.
        name: the argument's name, for the message.
        minimum: the smallest value allowed.
        alternative: what else the argument may be, for the message (``"or a tensor of edges"``).

    Raises:
        ValueError: naming the argument, what it must be and what it was.

    Example::

        >>> check_int(0, "bins")
        Traceback (most recent call last):
        ...
        ValueError: `bins` must be a positive integer, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"`{name}` must be {wanted}{' ' + alternative if alternative else ''}, got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """``value`` when it is one of ``choices``.

    Raises:
        ValueError: naming the argument, the choices and what it was.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's ``outputs``: a tensor itself; the ``logits`` of a Hugging Face ``ModelOutput``, a
    dataclass, a named tuple or a dict; otherwise a tuple's or list's first entry (auxiliary outputs after it).

    Raises:
        TypeError: naming the outputs' type and what to pass instead, when no logits are found.
    """
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    if not isinstance(outputs, Mapping) and isinstance(getattr(outputs, "logits", None), Tensor):
        return outputs.logits
    if isinstance(outputs, tuple | list) and outputs:
        return logits_of(outputs[0])
    raise TypeError(
        f"the model returned {type(outputs).__name__}, with no tensor of logits in it (a tensor, a `logits` field or "
        "key, or a tuple's first entry); pass `loss_fn(outputs, targets)` returning per-example losses, or "
        "`forward_fn(model, x)` returning logits."
    )


def default_loss_fn(outputs: Any, targets: Tensor) -> Tensor:
    """Per-example cross-entropy of the logits in ``outputs`` (:func:`logits_of`), the default loss of
    :func:`gradient_gram` and the callback."""
    return nn.functional.cross_entropy(logits_of(outputs), targets, reduction="none")


def check_model_mode(model: nn.Module) -> None:
    """Refuse a model whose per-example losses are coupled across the batch or random (BatchNorm, dropout)."""
    batch_statistics = _modules_where(
        model, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    )
    if batch_statistics:
        raise ValueError(
            f"`model` has BatchNorm modules without running statistics ({batch_statistics}): they normalise with the "
            "statistics of the batch even in eval mode, so one example's output depends on the others and "
            "per-example gradients are not defined. Use track_running_stats=True (the default)."
        )
    in_training = _modules_where(model, lambda m: m.training and isinstance(m, _TRAIN_MODE_COUPLED))
    if in_training:
        raise ValueError(
            f"`model` has BatchNorm or dropout modules in training mode ({in_training}): their output for one "
            "example depends on the rest of the batch or on random draws, so per-example gradients are not defined. "
            "Call `model.eval()` before computing the gradient Gram matrix."
        )


def _modules_where(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> str:
    """The names of the modules for which ``predicate`` holds, up to five, for an error message ("" if none)."""
    names = [name or type(model).__name__ for name, module in model.named_modules() if predicate(module)]
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def check_examples(inputs: Inputs, targets: Tensor, inputs_name: str, targets_name: str) -> None:
    """Check that a set of examples is non-empty, with one target per example.

    ``inputs`` may be a tensor, a tuple/list or a dict of tensors, the examples along dim 0 of each
    (:mod:`.inputs`).
    """
    count = num_examples(inputs, inputs_name)
    if not isinstance(targets, Tensor):
        raise ValueError(f"`{targets_name}` must be a tensor with one target per row, got {type(targets).__name__}.")
    if count == 0:
        raise ValueError(f"`{inputs_name}` must hold at least one example, got none along dim 0.")
    if targets.dim() == 0 or targets.shape[0] != count:
        raise ValueError(
            f"`{targets_name}` must have one entry per example of `{inputs_name}` ({count}), "
            f"got shape {tuple(targets.shape)}."
        )


def select_parameters(model: nn.Module, params: Sequence[str] | None) -> dict[str, Tensor]:
    """The parameters to differentiate, by name, in the model's own order.

    Shared parameters appear once (``named_parameters`` removes duplicates), under their first name.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen: dict[str, Tensor] = {name: p for name, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(
                "`model` has no trainable parameters (none with requires_grad=True); pass `params` to choose some."
            )
        return chosen
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise ValueError(f"`params` must be a list of parameter names, got {params!r}.")
    if len(params) == 0:
        raise ValueError("`params` must name at least one parameter, got an empty list.")
    unknown = [name for name in params if name not in named]
    if unknown:
        valid = ", ".join(list(named)[:20]) + (", ..." if len(named) > 20 else "")
        raise ValueError(f"`params` names parameters the model does not have: {unknown}. Valid names: {valid}.")
    wanted = set(params)
    return {name: p for name, p in named.items() if name in wanted}


def floating_dtype(params: dict[str, Tensor]) -> torch.dtype:
    """The dtype the Gram matrix is accumulated and returned in: the differentiated parameters', at least float32.

    Half-precision products (bfloat16 keeps 8 bits of mantissa) cannot tell the sign of a dot product near zero,
    which is what sign stiffness reads; float64 parameters give a float64 Gram matrix.
    """
    for p in params.values():
        if p.is_floating_point():
            return torch.promote_types(p.dtype, torch.float32)
    raise ValueError("`params` must include at least one floating-point parameter to differentiate.")


#: Example counts the loss is checked on before any Gram matrix or probe: two counts, so that a loss whose output
#: has a fixed length (a mean over the batch of [N, C] outputs, stacked scalar terms) cannot pass as per-example.
LOSS_CHECK_COUNTS = (2, 3)


def loss_check_counts(available: int) -> list[int]:
    """The counts of :data:`LOSS_CHECK_COUNTS` that ``available`` examples allow (at least one: ``available``)."""
    return [n for n in LOSS_CHECK_COUNTS if n <= available] or [available]


def called_loss(loss_fn: LossFn, outputs: Any, targets: Tensor) -> Any:
    """``loss_fn(outputs, targets)``; an error it raises (other than ``ValueError``, ``TypeError`` and running out
    of memory) becomes a ``ValueError`` naming ``loss_fn``, what it was given and the cause: a loss that cannot take
    the model's outputs (shapes that do not broadcast, integer targets for a regression loss, a loss class given
    where an instance belongs) fails the same way on every example, so it is a misconfiguration.
    """
    try:
        return loss_fn(outputs, targets)
    except (ValueError, TypeError, torch.OutOfMemoryError):
        raise
    except Exception as err:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"`loss_fn` cannot take the model's outputs ({shape}) and targets ({tuple(targets.shape)}, "
            f"{str(targets.dtype).removeprefix('torch.')}): {type(err).__name__}: {err}"
        ) from err


def check_loss_fn(forward: Callable[[Inputs], Any], loss_fn: LossFn, inputs: Inputs, targets: Tensor) -> None:
    """Run the loss on a few examples (``forward(x) -> outputs``), twice with different counts, and check it
    returns one loss per example each time.

    Raises:
        ValueError: from :func:`checked_losses` or :func:`called_loss`.
    """
    with torch.no_grad():
        for n in loss_check_counts(targets.shape[0]):
            checked_losses(called_loss(loss_fn, forward(take(inputs, slice(0, n))), targets[:n]), n)


def checked_losses(losses: Any, n: int) -> Tensor:
    """``losses``, checked to be what ``loss_fn`` must return on ``n`` examples: a tensor of shape [n].

    Raises:
        ValueError: naming ``loss_fn``, the shape it returned and ``reduction="none"`` (a mean or a sum over the
            batch is the usual cause).
    """
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (n,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"`loss_fn` must return per-example losses of shape [N]; on {n} examples it returned {shape}. "
            'Use `reduction="none"` (for example `nn.CrossEntropyLoss(reduction="none")`).'
        )
    return losses
