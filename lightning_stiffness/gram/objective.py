"""What every engine differentiates: each example's own loss as a function of the chosen parameters."""

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_stiffness.gram.buffers import BufferGuard
from lightning_stiffness.gram.inputs import Forward, ForwardFn, Inputs
from lightning_stiffness.gram.validation import LossFn


@dataclass
class Objective:
    """The model, its per-example loss, the parameters to differentiate, and the guard of its buffers.

    Attributes:
        model: the network, run through ``torch.func.functional_call`` so that no ``.grad`` is ever written.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-example losses.
        params: name -> parameter, every parameter the Gram matrix differentiates.
        guard: restores the model's buffers after each forward and backward (:mod:`.buffers`).
        forward_fn: ``forward_fn(model, x) -> outputs``; default ``model(x)``, ``model(*x)`` or ``model(**x)``.
    """

    model: nn.Module
    loss_fn: LossFn
    params: dict[str, Tensor]
    guard: BufferGuard
    forward_fn: ForwardFn | None = None
    aliases: dict[str, list[str]] = field(init=False)
    runner: Forward = field(init=False)
    differentiated: "_Gradients" = field(init=False)

    def __post_init__(self) -> None:
        # A parameter held by several modules (tied weights) is passed under each of their names, with
        # tie_weights=False: functional_call's own tying restores such a parameter wrongly (pytorch/pytorch#164759),
        # leaving the model holding a functorch tensor. A module reachable under two names is one slot: one name.
        names_of: dict[int, dict[tuple[int, str], str]] = defaultdict(dict)
        for name, p in self.model.named_parameters(remove_duplicate=False):
            module_name, _, local = name.rpartition(".")
            slot = (id(self.model.get_submodule(module_name)), local)
            names_of[id(p)].setdefault(slot, name)
        self.runner = Forward(self.model, self.forward_fn)
        self.differentiated = _Gradients(self.runner, self.loss_fn)
        self.aliases = {}
        for slots in names_of.values():
            names = list(slots.values())
            for name in names:
                self.aliases[name] = names

    def constants(self, variables: dict[str, Any]) -> dict[str, Tensor]:
        """The model's other parameters, detached, to pass beside ``variables`` (so autograd ignores them)."""
        return {name: p.detach() for name, p in self.model.named_parameters() if name not in variables}

    def _tensors(self, weights: dict[str, Tensor], constants: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        return {
            prefix + alias: t
            for source in (weights, constants)
            for name, t in source.items()
            for alias in self.aliases[name]
        }

    def loss(self, weights: dict[str, Tensor], constants: dict[str, Tensor], inputs: Inputs, targets: Tensor) -> Tensor:
        """The summed loss of ``inputs`` with the parameters in ``weights`` and ``constants`` (buffers: the model's)."""
        tensors = self._tensors(weights, constants, "model.")
        return self.loss_fn(functional_call(self.runner, tensors, (inputs,), tie_weights=False), targets).sum()

    def gradients(
        self,
        leaves: dict[str, Tensor],
        constants: dict[str, Tensor],
        inputs: Inputs,
        targets: Tensor,
        wanted: Callable[[], tuple[list[Tensor], bool]] | None = None,
    ) -> tuple[Tensor | None, ...]:
        """The summed loss's gradients with respect to ``leaves``, the backward run while they are the model's
        parameters: activation checkpointing recomputes its segments in the backward, with the parameters then in
        place, and must find the same ones as in the forward. ``wanted`` chooses other tensors to differentiate
        with respect to, once the forward has run (the outputs of recorded operations), and whether the graph is
        kept for more backward passes."""
        tensors = self._tensors(leaves, constants, "runner.model.")
        arguments = (inputs, targets, wanted or (lambda: (list(leaves.values()), False)))
        return functional_call(self.differentiated, tensors, arguments, tie_weights=False)


class _Gradients(nn.Module):
    """The loss and its gradients in one call, so that ``functional_call`` keeps the parameters through both."""

    def __init__(self, runner: Forward, loss_fn: LossFn) -> None:
        super().__init__()
        self.runner = runner
        self.loss_fn = loss_fn

    def forward(
        self, inputs: Inputs, targets: Tensor, wanted: Callable[[], tuple[list[Tensor], bool]]
    ) -> tuple[Tensor | None, ...]:
        loss = self.loss_fn(self.runner(inputs), targets).sum()
        tensors, retain_graph = wanted()
        if not loss.requires_grad or not tensors:  # no differentiated parameter reaches the loss
            return (None,) * len(tensors)
        return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=retain_graph)
