"""The torch.func Gram engine: per-example gradients with ``vmap(grad(...))`` over ``functional_call``.

It is exact for any model that ``vmap`` can run, and fast where the model is small enough for per-example gradients
of a block of examples to fit in memory. Models with data-dependent control flow, RNN kernels, in-place writes of
per-example values into buffers or ``autograd.Function`` s without vmap support make ``vmap`` raise: the loop engine
(:mod:`.loop`) covers them. Blocks of per-example gradients become the Gram matrix in :mod:`.blocks`.
"""

import warnings

from torch import Tensor
from torch.func import grad, vmap

from lightning_stiffness.gram.blocks import Gradients, PerExampleFn
from lightning_stiffness.gram.inputs import Inputs, apply
from lightning_stiffness.gram.objective import Objective


def torchfunc_per_example(objective: Objective, names: list[str]) -> PerExampleFn:
    """Per-example gradients of ``objective``'s parameters ``names``, a block of examples per ``vmap`` call.

    The model's other parameters are constants; its buffers are restored after each call.
    """
    weights = {name: objective.params[name].detach() for name in names}
    constants = objective.constants(weights)

    def example_loss(w: Gradients, x: Inputs, y: Tensor) -> Tensor:
        return objective.loss(w, constants, apply(x, lambda t: t.unsqueeze(0)), y.unsqueeze(0))

    gradients = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def per_example(inputs: Inputs, targets: Tensor) -> Gradients:
        try:
            with warnings.catch_warnings():
                # vmap's notice that an op runs without a batching rule (attention kernels on the CPU): slower only.
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return gradients(weights, inputs, targets)
        except RuntimeError as error:  # what vmap cannot batch: RNN kernels, packed sequences, in-place updates
            raise RuntimeError(
                f"torch.func (vmap) cannot run this model: {error}. method='loop' can (one backward pass per "
                "example), and method='auto' uses it where needed."
            ) from error
        finally:
            objective.guard.restore()

    return per_example
