"""The Gram matrix of per-example loss gradients, G[i, j] = <g_i, g'_j>.

:func:`gradient_gram` checks its arguments and hands the work to an engine; all are exact:

- ``"auto"`` (alias ``"factored"``): one batched forward/backward with hooks and per-layer rules (:mod:`.rules`,
  :mod:`.factored`), much faster where layers are covered (Linear, Conv1d/2d, LayerNorm, GroupNorm, BatchNorm in
  eval mode). Every term is checked per example against autograd (:mod:`.check`) before it is used; what no rule
  covers, or fails the check, goes to torch.func, or to the loop engine where torch.func cannot run the model.
- ``"torch.func"``: ``vmap(grad(...))`` over ``functional_call`` (:mod:`.torchfunc`), for models ``vmap`` can run.
- ``"loop"``: one ``torch.autograd.grad`` per example (:mod:`.loop`), for anything autograd runs.

Whatever the engine, the model is left as it was: parameters, ``.grad``, and every buffer bitwise, even buffers its
forward updates in eval mode (:mod:`.buffers`). See ``lightning_stiffness/gram/README.md`` for the design.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_stiffness.gram.blocks import Progress, blocked_gram
from lightning_stiffness.gram.buffers import dense_gradients, untouched_buffers
from lightning_stiffness.gram.check import CHECK_EXAMPLES
from lightning_stiffness.gram.factored import GramPlan, factored_grams, owner
from lightning_stiffness.gram.inputs import ForwardFn, Inputs, apply, take
from lightning_stiffness.gram.loop import loop_per_example
from lightning_stiffness.gram.objective import Objective
from lightning_stiffness.gram.options import GramOptions
from lightning_stiffness.gram.rules import Term
from lightning_stiffness.gram.torchfunc import torchfunc_per_example
from lightning_stiffness.gram.validation import (
    LossFn,
    check_choice,
    check_examples,
    check_int,
    check_loss_fn,
    check_model_mode,
    default_loss_fn,
    floating_dtype,
    select_parameters,
)


@contextmanager
def full_float32_precision() -> Iterator[None]:
    """No TF32 in float32 matmuls and convolutions inside the block (restored after).

    TF32 keeps 10 bits of mantissa: enough to train with, not to tell the sign of a dot product near zero, which is
    what sign stiffness reads.
    """
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


#: The values ``method`` accepts.
METHODS = ("auto", "factored", "torch.func", "loop")

__all__ = ["METHODS", "GramOptions", "GramPlan", "gradient_gram", "gradient_gram_with", "gram_plan"]


def gradient_gram(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    inputs2: Inputs | None = None,
    targets2: Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    per_layer: bool = False,
    progress: Progress = None,
    gather_columns: Callable[[Term], Term] | None = None,
    forward_fn: ForwardFn | None = None,
) -> Tensor | dict[str, Tensor]:
    r"""Gram matrix of per-example loss gradients.

    .. math::
        G_{ij} = \langle \nabla_\theta \ell(f(x_i), y_i),\ \nabla_\theta \ell(f(x'_j), y'_j) \rangle

    where :math:`\ell` is each example's own loss (Fort et al., "Stiffness: A New Perspective on Generalization in
    Neural Networks", arXiv 1901.09491). Cosine and sign stiffness follow from it
    (:func:`~lightning_stiffness.functional.cosine_stiffness`, :func:`~lightning_stiffness.functional.sign_stiffness`).

    The model is evaluated as given: the caller picks ``model.eval()`` or train mode. A model with BatchNorm or
    dropout in training mode is refused with a ``ValueError`` asking for ``model.eval()``, because those layers
    couple the examples of a batch (or draw random masks) and per-example gradients are then not defined.
    The model is left exactly as it was: parameters, buffers (bitwise, even those its forward updates in eval mode),
    ``requires_grad`` flags and ``.grad``. Each example is measured with the buffers as they were.

    Args:
        model: the network; ``model(inputs)`` (or ``forward_fn(model, inputs)``) must give the outputs ``loss_fn``
            takes.
        inputs: examples, along dim 0: a tensor (images, features, token ids), a tuple of tensors (the model's
            positional arguments) or a dict of tensors (its keyword arguments: ``input_ids``, ``attention_mask``).
        targets: one target per example.
        inputs2: a second set of examples for a cross Gram matrix [N, M]; ``None`` for the square Gram of ``inputs``.
        targets2: targets of ``inputs2``.
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses of shape [N]. Default: cross-entropy
            with ``reduction="none"``.
        params: names (as in ``model.named_parameters()``) of the parameters to differentiate. Default: every
            parameter with ``requires_grad=True``.
        method: ``"auto"`` (or its alias ``"factored"``), ``"torch.func"`` or ``"loop"`` (see the module docstring).
            All are exact. ``"auto"`` warns once when part of the model needs the loop engine.
        chunk_size: examples per block; bounds memory. For torch.func and the loop, examples per block of
            per-example gradients (default: from a memory budget of 2 GiB for the blocks held at once); for the
            factored engine, examples per batched forward/backward (default: as many as keep the recorded layer
            inputs and outputs under 128 MiB, at most 512), in spans of even sizes, never of one example alone
            (two or three where ``chunk_size`` is 1 or 2).
        per_layer: return the Gram matrix of each layer's parameters instead of their sum (G = sum of the layers').
        progress: called as ``progress(done, total)`` as the computation advances.
        forward_fn: ``forward_fn(model, x) -> outputs`` for a model called otherwise than ``model(x)`` (a
            LightningModule whose network is ``self.model``, a forward that needs extra arguments). Default:
            ``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict.
        gather_columns: for distributed use (the callback under DDP): ``inputs`` are this process's rows,
            ``inputs2`` all examples, and the factored engine gathers each layer's column factors from all processes
            with this function (a factored term of this process's rows -> the same term over all examples) instead
            of recomputing them. The torch.func engine and parameters no rule covers still use ``inputs2``.

    Returns:
        A tensor [N, M] (M = N when ``inputs2`` is None) on the model's device, in the floating dtype of the
        differentiated parameters. With ``per_layer``, a dict: module name (or, for a parameter registered on the
        model itself, the parameter name) -> [N, M], in the model's order.

    Warns:
        UserWarning: with ``"auto"``, when some parameters need the loop engine (torch.func cannot run the model),
            naming their modules and the reason.

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
    options = GramOptions(loss_fn, forward_fn, params, method, chunk_size, per_layer, progress, gather_columns)
    return gradient_gram_with(options, model, inputs, targets, inputs2, targets2)


def gradient_gram_with(
    options: GramOptions,
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    inputs2: Inputs | None = None,
    targets2: Tensor | None = None,
) -> Tensor | dict[str, Tensor]:
    """:func:`gradient_gram` with its keywords as one :class:`~lightning_stiffness.gram.options.GramOptions`: the
    form the rest of the package calls. Arguments, result and errors as for :func:`gradient_gram`."""
    check_choice(options.method, "method", METHODS)
    if options.chunk_size is not None:
        check_int(options.chunk_size, "chunk_size", alternative="or None")
    if (inputs2 is None) != (targets2 is None):
        raise ValueError("`inputs2` and `targets2` must be given together (both or neither).")
    if inputs2 is None and options.gather_columns is not None:
        raise ValueError("`gather_columns` needs `inputs2` and `targets2`: all the examples of the columns.")
    setup = _Setup(model, options)
    inputs, targets = setup.examples(inputs, targets, "inputs", "targets")
    if inputs2 is not None and targets2 is not None:
        inputs2, targets2 = setup.examples(inputs2, targets2, "inputs2", "targets2")
    with setup.objective(inputs, targets) as objective:
        if options.method in ("auto", "factored"):
            grams, _ = factored_grams(objective, inputs, targets, inputs2, targets2, options, setup.dtype)
        else:
            engine = torchfunc_per_example if options.method == "torch.func" else loop_per_example
            groups = {name: owner(name) for name in setup.chosen} if options.per_layer else None
            grams = blocked_gram(
                engine(objective, list(setup.chosen)), setup.chosen, inputs, targets, inputs2, targets2,
                options.chunk_size, setup.dtype, options.progress, groups,
            )  # fmt: skip
    if options.per_layer:
        order = list(dict.fromkeys(owner(name) for name in setup.chosen))
        return {key: grams[key] for key in order}
    layers = list(grams.values())
    total = layers[0]
    for gram in layers[1:]:
        total.add_(gram)
    return total


class _Setup:
    """The checked arguments every entry point shares: model, parameters, loss, forward, device and dtype."""

    def __init__(self, model: nn.Module, options: GramOptions) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        forward_fn = options.forward_fn
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError(f"`forward_fn` must be a callable (module, x) -> outputs, got {forward_fn!r}.")
        check_model_mode(model)
        self.model, self.forward_fn = model, forward_fn
        self.chosen = select_parameters(model, options.params)
        self.dtype = floating_dtype(self.chosen)
        self.loss_fn = options.loss_fn or default_loss_fn
        self.device = next(iter(self.chosen.values())).device

    def examples(self, inputs: Inputs, targets: Tensor, inputs_name: str, targets_name: str):
        """The examples, checked and moved to the model's device."""
        check_examples(inputs, targets, inputs_name, targets_name)
        return apply(inputs, lambda t: t.to(self.device)), targets.to(self.device)

    @contextmanager
    def objective(self, inputs: Inputs, targets: Tensor) -> Iterator[Objective]:
        """The objective, once the loss is checked on a few examples; buffers restored and TF32 off throughout."""
        # Every engine is a plain function of the parameters: no .grad is written, the buffers are restored.
        with (
            untouched_buffers(self.model) as guard,
            dense_gradients(self.model),
            torch.enable_grad(),
            full_float32_precision(),
        ):
            objective = Objective(self.model, self.loss_fn, self.chosen, guard, self.forward_fn)
            check_loss_fn(objective.runner, self.loss_fn, inputs, targets)
            guard.restore()
            yield objective


def gram_plan(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | None = None,
    forward_fn: ForwardFn | None = None,
) -> GramPlan:
    """How the default engine computes each parameter's share of the Gram matrix, from a run on a few examples.

    The run takes the first examples the per-example check uses (three), so the plan is the one ``gradient_gram``
    follows on the same model and layouts. Its ``forms`` name each parameter's factored form or exact engine, and
    ``fallback`` why a parameter is not factored, and ``calls`` which operations
    its per-example gradients came from (an operation without a factored rule, such as ``F.bilinear``, gives them from
    its own vjp). Arguments as for :func:`gradient_gram`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_stiffness.gram import gram_plan
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
        >>> plan = gram_plan(model, torch.randint(0, 10, (3, 2)), torch.tensor([0, 1, 2]))
        >>> plan.forms
        {'0.weight': 'tokens', '2.weight': 'outer', '2.bias': 'flat'}
        >>> bilinear = nn.Bilinear(3, 3, 2)
        >>> gram_plan(bilinear, (torch.randn(3, 3), torch.randn(3, 3)), torch.tensor([0, 1, 0])).calls
        {'weight': ['F.bilinear (its own vjp)'], 'bias': ['F.bilinear (its own vjp)']}
    """
    options = GramOptions(loss_fn=loss_fn, forward_fn=forward_fn, params=params)
    setup = _Setup(model, options)
    check_examples(inputs, targets, "inputs", "targets")
    few_x, few_y = setup.examples(take(inputs, slice(0, CHECK_EXAMPLES)), targets[:CHECK_EXAMPLES], "inputs", "targets")
    with setup.objective(few_x, few_y) as objective:
        _, plan = factored_grams(objective, few_x, few_y, options=options, dtype=setup.dtype)
    return plan
