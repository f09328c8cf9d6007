"""What every engine differentiates: each example's own loss as a function of the chosen parameters."""

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lightning_stiffness.gram.buffers import BufferGuard
from lightning_stiffness.gram.validation import LossFn


@dataclass
class Objective:
    """The model, its per-example loss, the parameters to differentiate, and the guard of its buffers.

    Attributes:
        model: the network, run through ``torch.func.functional_call`` so that no ``.grad`` is ever written.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-example losses.
        params: name -> parameter, every parameter the Gram matrix differentiates.
        guard: restores the model's buffers after each forward and backward (:mod:`.buffers`).
    """

    model: nn.Module
    loss_fn: LossFn
    params: dict[str, Tensor]
    guard: BufferGuard

    def constants(self, variables: dict[str, Any]) -> dict[str, Tensor]:
        """The model's other parameters, detached, to pass beside ``variables`` (so autograd ignores them)."""
        return {name: p.detach() for name, p in self.model.named_parameters() if name not in variables}

    def loss(self, weights: dict[str, Tensor], constants: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        """The summed loss of ``inputs`` with the parameters in ``weights`` and ``constants`` (buffers: the model's)."""
        return self.loss_fn(functional_call(self.model, (weights, constants), (inputs,)), targets).sum()
