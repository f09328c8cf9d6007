"""The loop Gram engine: one ``torch.autograd.grad`` per example.

The slowest engine and the most general: exact for anything autograd can differentiate, including what ``vmap``
cannot run (RNN/GRU/LSTM kernels, packed sequences, data-dependent control flow, old-style ``autograd.Function`` s,
ops without batching rules). Each example runs alone through the model (a batch of one), with the buffers as they
were before the first example. Blocks of per-example gradients become the Gram matrix in :mod:`.blocks`, as for the
torch.func engine; it is also the independent reference the factored engine checks its terms against.
"""

import torch
from torch import Tensor

from lightning_stiffness.gram.blocks import Gradients, PerExampleFn
from lightning_stiffness.gram.inputs import Inputs, take
from lightning_stiffness.gram.objective import Objective


def loop_per_example(objective: Objective, names: list[str]) -> PerExampleFn:
    """Per-example gradients of ``objective``'s parameters ``names``, one backward pass per example.

    A parameter the loss does not depend on gets zeros. The buffers are restored after every example.
    """
    leaves = {name: objective.params[name].detach().requires_grad_(True) for name in names}
    constants = objective.constants(leaves)

    def per_example(inputs: Inputs, targets: Tensor) -> Gradients:
        count = targets.shape[0]
        out = {name: torch.zeros((count, *p.shape), dtype=p.dtype, device=p.device) for name, p in leaves.items()}
        for i in range(count):
            try:
                grads = objective.gradients(leaves, constants, take(inputs, slice(i, i + 1)), targets[i : i + 1])
            finally:
                objective.guard.restore()
            for name, g in zip(leaves, grads, strict=True):
                if g is not None:  # a functional sparse lookup (F.embedding(..., sparse=True)) gives a sparse one
                    out[name][i] = g.to_dense() if g.layout != torch.strided else g
        return out

    return per_example
