"""Examples' representations: the outputs of chosen modules, for distances in representation space.

The paper measures stiffness against distance in input space and in each layer's representation; deeper layers have
smaller stiff domains. :func:`layer_outputs` runs the model once (no gradients) and returns the flattened outputs of
the named modules; the callback takes them from the same forward pass that checks the probe examples' losses.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stiffness.gram.buffers import untouched_buffers
from lightning_stiffness.gram.inputs import ForwardFn, Inputs, apply, default_forward, num_examples, take


def check_layer_names(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The names in ``layers``, in network order (the order of ``model.named_modules()``).

    Raises:
        ValueError: for a name that is not a module of the model, listing the valid names.
    """
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"`layers` must be a non-empty list of module names, got {layers!r}.")
    unknown = [name for name in layers if name not in names]
    if unknown:
        shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
        raise ValueError(f"`layers` names modules the model does not have: {unknown}. Valid module names: {shown}.")
    position = {name: i for i, name in enumerate(names)}
    return sorted(dict.fromkeys(layers), key=position.__getitem__)


@contextmanager
def recording(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the flattened output of each named module for every forward run inside the block.

    Yields a dict name -> list of [B, D] tensors, one per forward call of that module (detached).
    """
    modules = dict(model.named_modules())
    records: dict[str, list[Tensor]] = {name: [] for name in layers}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
                output = output[0]  # modules such as nn.LSTM or attention return (output, extras)
            if not isinstance(output, Tensor):
                raise ValueError(f"`layers`: module {name!r} returns {type(output).__name__}, not a tensor.")
            records[name].append(output.detach().reshape(output.shape[0], -1))

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def forward_with_outputs(
    model: nn.Module,
    inputs: Inputs,
    layers: Sequence[str] = (),
    chunk_size: int = 512,
    forward_fn: ForwardFn | None = None,
    per_chunk: Callable[[Any, slice], Tensor] | None = None,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """``per_chunk``'s tensors and the named modules' flattened outputs, over ``inputs`` in chunks, without gradients.

    ``inputs`` and ``forward_fn`` as for :func:`~lightning_stiffness.gram.gradient_gram`. The model's outputs may be
    anything (a tensor, a Hugging Face ``ModelOutput``, a tuple, a dict): they are never joined, only handed to
    ``per_chunk(outputs, examples)`` (``examples`` the chunk's slice of ``inputs``), whose tensors (examples along
    dim 0, for example per-example losses) are joined; without ``per_chunk`` the first value is ``None``. Buffers the
    forward updates are restored (bitwise) after each chunk.

    Raises:
        ValueError: when a named module runs more than once (or not at all) per forward, so that one example has no
            single representation there.
    """
    reduced: list[Tensor] = []
    per_layer: dict[str, list[Tensor]] = {name: [] for name in layers}
    with torch.no_grad(), untouched_buffers(model) as guard, recording(model, layers) as records:
        for start in range(0, num_examples(inputs), chunk_size):
            for calls in records.values():
                calls.clear()
            chunk = slice(start, min(start + chunk_size, num_examples(inputs)))
            outputs = (forward_fn or default_forward)(model, take(inputs, chunk))
            if per_chunk is not None:
                reduced.append(per_chunk(outputs, chunk))
            del outputs  # before the next chunk runs: a large model's outputs (hidden states, caches) are not kept
            guard.restore()  # every chunk sees the buffers as they were, and none is left changed
            for name, calls in records.items():
                if len(calls) != 1:
                    raise ValueError(
                        f"`layers`: module {name!r} ran {len(calls)} times in one forward pass; a representation "
                        "needs a module that runs exactly once."
                    )
                per_layer[name].append(calls[0])
    joined = torch.cat(reduced) if per_chunk is not None else None
    return joined, {name: torch.cat(parts) for name, parts in per_layer.items()}


def layer_outputs(
    model: nn.Module,
    inputs: Inputs,
    layers: Sequence[str],
    chunk_size: int = 512,
    forward_fn: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """Flattened outputs [N, D] of the named modules for ``inputs`` (one forward pass, no gradients).

    Args:
        model: the network (evaluated as given: call ``model.eval()`` first for eval-mode representations).
        inputs: examples along dim 0: a tensor, a tuple of tensors (positional arguments) or a dict of tensors
            (keyword arguments).
        layers: module names as in ``model.named_modules()``, for example ``["net.2", "net.4"]``.
        chunk_size: examples per forward pass.
        forward_fn: ``forward_fn(model, x) -> outputs``; default ``model(x)``, ``model(*x)`` or ``model(**x)``.

    Returns:
        name -> [N, D] tensor, in network order.

    Raises:
        ValueError: for an unknown module name (the message lists the valid ones), a module that does not run
            exactly once per forward, or inputs that are not tensors with the same number of examples along dim 0.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_stiffness.functional import layer_outputs, pairwise_distances
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> hidden = layer_outputs(model, torch.randn(5, 4), ["1"])["1"]
        >>> pairwise_distances(hidden).shape
        torch.Size([5, 5])
    """
    ordered = check_layer_names(model, layers)
    num_examples(inputs)
    device = next(iter(model.parameters()), torch.empty(0)).device
    return forward_with_outputs(model, apply(inputs, lambda t: t.to(device)), ordered, chunk_size, forward_fn)[1]
