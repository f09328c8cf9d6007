"""One batched forward and backward that records every use of a differentiated parameter.

Two recorders run together:

- operations (:mod:`.ops`): a ``TorchFunctionMode`` sees every call of a function with a rule (``F.linear``,
  ``F.conv2d``, ``F.embedding``, the norms, a parameter added, multiplied or expanded), whichever module makes it, and
  records the call when one of its parameter arguments is a differentiated parameter or a dim-0 slice of one (the
  packed in-projection of ``nn.MultiheadAttention``, split into query/key/value slices for cross-attention);
- modules with a user rule (:mod:`.rules`): a forward hook records their input and output, and their parameters are
  left out of the operation recorder.

A function mode does not see the calls made inside a Python-level torch function it dispatched
(``F.multi_head_attention_forward`` calls ``linear`` four times); while such a function runs with a differentiated
parameter among its arguments, the ``torch.nn.functional`` names of the rules' functions are pointed at the recorder.
The backward of the summed loss then gives the gradient of each recorded output.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_stiffness.gram.inputs import Inputs
from lightning_stiffness.gram.objective import Objective
from lightning_stiffness.gram.ops import OP_RULES, OpRule
from lightning_stiffness.gram.rules import GramRule


@dataclass(frozen=True)
class ParamSlice:
    """A differentiated parameter, or the rows ``[start, stop)`` of its dim 0 (None: all of it), or its transpose
    (``W.T``, ``W.t()``, ``W.transpose(0, 1)`` of a matrix)."""

    name: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


@dataclass
class Use:
    """One recorded call: the rule, its bound arguments, the parameters by role, and its output."""

    rule: OpRule | GramRule
    bound: dict[str, Any]
    params: dict[str, ParamSlice]
    output: Tensor
    version: int
    backprop: Tensor | None = None
    module: nn.Module | None = None
    hooked: Tensor | None = None  # the output's gradient as its hook saw it (before any in-place change)

    def __post_init__(self) -> None:
        # A hook registered now receives the gradient with respect to the output as the call returned it, even when
        # the model then writes to it in place (ReLU(inplace=True) after a convolution or a norm).
        def keep(grad: Tensor) -> None:
            self.hooked = grad.detach()

        self.output.register_hook(keep)

    @property
    def signature(self) -> tuple:
        """What identifies the use from one forward to the next (the same call of the same parameters)."""
        return (id(self.rule), tuple(sorted(self.params.items())))


@dataclass
class Recording:
    """The uses of one forward, in call order, and why some parameters could not be recorded."""

    uses: list[Use] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # every differentiated parameter, in the model's order
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # and its shape
    plain: list[Use] = field(default_factory=list)  # the uses whose own output the backward differentiates


def _torch_functional_names() -> dict[str, Callable[..., Any]]:
    """``torch.nn.functional`` names of functions with a rule (what its Python functions call internally)."""
    return {name: fn for name, fn in vars(F).items() if callable(fn) and fn in OP_RULES}


class _Recorder(TorchFunctionMode):
    def __init__(self, tracked: dict[int, str], recording: Recording) -> None:
        super().__init__()
        self.tracked = tracked
        self.recording = recording
        self.enabled = True

    def slice_of(self, value: Any) -> ParamSlice | None:
        """The parameter (or dim-0 slice of one) ``value`` is, if any."""
        if not isinstance(value, Tensor):
            return None
        name = self.tracked.get(id(value))
        if name is not None:
            return ParamSlice(name)
        base = value._base
        name = self.tracked.get(id(base)) if base is not None else None
        if name is None or value.dim() != base.dim() or value.dim() == 0:
            return None
        transposed = (
            value.dim() == 2
            and value.shape == base.shape[::-1]
            and value.stride() == base.stride()[::-1] != base.stride()
            and value.storage_offset() == base.storage_offset()
        )
        if transposed:
            return ParamSlice(name, transposed=True)
        offset = value.storage_offset() - base.storage_offset()
        rows_contiguous = value.shape[1:] == base.shape[1:] and value.stride() == base.stride()
        if not rows_contiguous or offset % base.stride(0):
            return None
        start = offset // base.stride(0)
        return ParamSlice(name, (start, start + value.shape[0]))

    def _touches(self, args: tuple, kwargs: dict) -> bool:
        values = list(args) + list(kwargs.values())
        return any(self.slice_of(value) is not None for value in values)

    def record(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        output = func(*args, **kwargs)
        if not self._touches(args, kwargs):
            return output
        rule = OP_RULES[func]
        bound = rule.bind(args, kwargs)
        params = {}
        for role in rule.roles:
            where = self.slice_of(bound.get(role)) if bound is not None else None
            if where is not None:
                params[role] = where
        if bound is None:
            for value in list(args) + list(kwargs.values()):
                where = self.slice_of(value)
                if where is not None:
                    why = (
                        f"{_name(func)} with settings no rule covers (a grouped convolution, a max_norm embedding, ...)"
                    )
                    self.recording.unsupported[where.name] = why
        elif params and isinstance(output, Tensor) and output.requires_grad:
            self.recording.uses.append(Use(rule, bound, params, output, output._version))
        return output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        if func in OP_RULES:
            return self.record(func, args, kwargs)
        if getattr(func, "__module__", None) == F.__name__ and self._touches(args, kwargs):
            with self._inside_functional():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    @contextmanager
    def _inside_functional(self) -> Iterator[None]:
        """Point ``torch.nn.functional``'s names of ruled functions at the recorder while one of its functions runs.

        Only calls with a differentiated parameter (private to this engine) are recorded; any other call, from any
        thread, goes through unchanged.
        """
        originals = _torch_functional_names()
        namespace = vars(F)
        for name, fn in originals.items():
            namespace[name] = _recording_call(self, fn)
        try:
            yield
        finally:
            namespace.update(originals)


def _recording_call(recorder: _Recorder, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return recorder.record(fn, args, kwargs)

    return call


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", None) or repr(func)


def record_uses(
    objective: Objective,
    module_rules: dict[str, tuple[nn.Module, GramRule, dict[str, str]]],
    inputs: Inputs,
    targets: Tensor,
) -> Recording:
    """Run one batched forward and backward of ``inputs``; return every use with the gradient of its output.

    Args:
        objective: the model, loss and differentiated parameters.
        module_rules: module name -> (module, its user rule, local -> full names of the parameters it covers).
        inputs: a chunk of examples.
        targets: their targets.
    """
    leaves = {name: p.detach().requires_grad_(True) for name, p in objective.params.items()}
    by_module = {full for _, _, params in module_rules.values() for full in params.values()}
    tracked = {id(leaf): name for name, leaf in leaves.items() if name not in by_module}
    recording = Recording(order=list(objective.params), shapes={n: p.shape for n, p in objective.params.items()})

    def hook_for(module_name: str):
        _, rule, params = module_rules[module_name]

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            first = args[0] if args else kwargs.get("input")
            if isinstance(first, Tensor) and isinstance(output, Tensor) and output.requires_grad:
                bound = {"input": first.detach()}
                slices = {local: ParamSlice(full) for local, full in params.items()}
                recording.uses.append(Use(rule, bound, slices, output, output._version, module=mod))
            else:
                for full in params.values():
                    recording.unsupported[full] = "its module was called without one tensor input and output"

        return hook

    handles = [
        module.register_forward_hook(hook_for(name), with_kwargs=True) for name, (module, _, _) in module_rules.items()
    ]
    recorder = _Recorder(tracked, recording)

    def differentiate_after_forward() -> list[Tensor]:
        # The backward runs inside the same mode and parameters as the forward (activation checkpointing recomputes
        # segments in it, and must take the same paths), with recording off.
        recorder.enabled = False
        return _backward_targets(recording, leaves)

    try:
        with recorder:
            grads = objective.gradients(
                leaves, objective.constants(leaves), inputs, targets, differentiate_after_forward
            )
        _assign_backprops(recording, grads)
    finally:
        for handle in handles:
            handle.remove()
        objective.guard.restore()
    return recording


def _backward_targets(recording: Recording, leaves: dict[str, Tensor]) -> list[Tensor]:
    """What the backward differentiates: each use's output, or, for an output written in place after its call (by
    ``ReLU(inplace=True)``), its parameters, so that the hook registered at the call sees the output's gradient."""
    plain = [use for use in recording.uses if use.output._version == use.version]
    modified = [use for use in recording.uses if use.output._version != use.version]
    through = list({at.name: leaves[at.name] for use in modified for at in use.params.values()}.values())
    recording.plain = plain
    return [use.output for use in plain] + through


def _assign_backprops(recording: Recording, grads: tuple[Tensor | None, ...]) -> None:
    """Fill each use's ``backprop``: the gradient of the summed loss with respect to its output."""
    for use, grad in zip(recording.plain, grads, strict=False):
        use.backprop = grad.detach() if grad is not None else None
    for use in recording.uses:
        if use.backprop is None:
            use.backprop = use.hooked if use.hooked is not None else torch.zeros_like(use.output)
        use.output = use.output.detach()
