"""Buffers (and parameters) left exactly as they were, whatever a forward does to them.

Some forwards update buffers even in eval mode: a running mean updated in place (``self.mean.mul_(0.9).add_(...)``),
a call counter (``self.calls += 1``), a statistic reassigned (``self.stat = 0.9 * self.stat + ...``). A measurement
that runs such a forward must not leave those changes behind (training with the callback would no longer follow the
trajectory it follows without it), and each example must see the buffers as they were, or its gradient would depend
on the examples measured before it. :class:`BufferGuard` snapshots every buffer and puts back, after each forward and
backward, whatever changed: the same tensor object in each buffer slot, holding the same bits.

A few forwards write to parameters too: ``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, in place.
The guard keeps a copy of every parameter's values as well and writes back any that changed, so the model's
parameters stay bitwise as they were (at the memory cost of one copy of the model's parameters).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class BufferGuard:
    """A snapshot of every buffer and parameter value of ``model``, restored bitwise by :meth:`restore`.

    Changes are found from each tensor's version counter (bumped by every in-place write) and the identity of the
    tensor in its module's buffer slot, so an untouched model costs one pass over its buffers, not a comparison.
    The snapshot holds a copy of each buffer and parameter (their total size in memory).

    Args:
        model: the module whose buffers (its own and its submodules') are guarded.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [(module, dict(module._buffers)) for module in model.modules()]
        buffers = [buffer for _, slots in self._modules for buffer in slots.values() if buffer is not None]
        tensors = buffers + list(model.parameters())
        self._copies: list[tuple[Tensor, list[int], Tensor]] = [
            (tensor, [_version(tensor)], tensor.detach().clone()) for tensor in tensors
        ]

    def restore(self) -> None:
        """Put back every buffer a forward replaced, wrote to or registered (a slot that was ``None`` included), and
        every parameter value it wrote to."""
        for module, slots in self._modules:
            if module._buffers.keys() != slots.keys() or any(
                module._buffers[name] is not buffer for name, buffer in slots.items()
            ):
                module._buffers.clear()
                module._buffers.update(slots)
        for buffer, version, copy in self._copies:
            if _version(buffer) != version[0]:
                with torch.no_grad():
                    buffer.copy_(copy)
                version[0] = _version(buffer)


def _version(tensor: Tensor) -> int:
    # Inference tensors have no version counter; they cannot be written to outside inference mode either.
    return -1 if tensor.is_inference() else tensor._version


@contextmanager
def untouched_buffers(model: nn.Module) -> Iterator[BufferGuard]:
    """Guard ``model``'s buffers for the block (restored on exit, also on an exception); yields the guard."""
    guard = BufferGuard(model)
    try:
        yield guard
    finally:
        guard.restore()


@contextmanager
def dense_gradients(model: nn.Module) -> Iterator[None]:
    """Embeddings built with ``sparse=True`` (``nn.Embedding``, ``nn.EmbeddingBag``) give dense gradients in the block.

    Every engine forms per-example gradients as dense rows, and torch can neither copy a sparse gradient into them,
    reshape it, nor ``vmap`` over it. The values are the same either way: ``sparse`` chooses only the layout of the
    table's gradient. The flags are put back on exit, also on an exception.
    """
    flipped = [m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse]
    for module in flipped:
        module.sparse = False
    try:
        yield
    finally:
        for module in flipped:
            module.sparse = True
