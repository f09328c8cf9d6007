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

import weakref
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
from lightning_stiffness.gram.ops import OP_RULES, OPERATION_VJP, OpRule, size_arguments
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
    derived: dict[str, "Derived"] = field(default_factory=dict)  # operands computed from parameters, by role
    op: str = ""  # the operation's name, for the plan: ``F.linear``, ``Tensor.__add__``, a module's class

    def __post_init__(self) -> None:
        # A hook registered now receives the gradient with respect to the output as the call returned it, even when
        # the model then writes to it in place (ReLU(inplace=True) after a convolution or a norm).
        def keep(grad: Tensor) -> None:
            self.hooked = grad.detach()

        self.output.register_hook(keep)
        base = self.output._base
        if base is not None and base.requires_grad:
            # F.linear with a bias on [N, T, d] returns a view of its [N * T, p] result. A view written in place
            # (``h += x``, ``h.mul_(s)``) is rebased onto its base and loses its own hooks; the base's hook still sees
            # the gradient before the change, read here through the view's geometry.
            size, stride = self.output.size(), self.output.stride()
            offset = self.output.storage_offset() - base.storage_offset()
            base_size, base_stride = base.size(), base.stride()

            def keep_through_base(grad: Tensor) -> None:
                if self.hooked is not None:  # the view's own hook fired: it was not written in place
                    return
                if grad.stride() != base_stride:
                    laid = torch.empty_strided(base_size, base_stride, dtype=grad.dtype, device=grad.device)
                    grad = laid.copy_(grad)
                self.hooked = grad.detach().as_strided(size, stride, offset)

            base.register_hook(keep_through_base)

    @property
    def signature(self) -> tuple:
        """What identifies the use from one forward to the next (the same call of the same parameters)."""
        derived = tuple(sorted((role, tuple(sorted(d.sources))) for role, d in self.derived.items()))
        return (
            id(self.rule),
            getattr(self.bound.get("func"), "__name__", None),
            tuple(sorted(self.params.items())),
            derived,
        )

    @property
    def roles(self) -> frozenset[str]:
        """The call's arguments that hold parameters or derived operands."""
        return frozenset(self.params) | frozenset(self.derived)

    @property
    def names(self) -> set[str]:
        """The differentiated parameters whose gradients go through this call (directly or through an operand)."""
        return {at.name for at in self.params.values()} | {name for d in self.derived.values() for name in d.sources}


@dataclass(frozen=True)
class Derived:
    """An operand computed from differentiated parameters and no example (a position embedding of ``[1, T]`` ids, a
    gathered table of relative position biases, a weight-normalised weight, ``W * scale``), where it meets the
    examples. Its per-example gradients, from the call's rule, go back to its ``sources`` through its own graph."""

    key: int  # the operand's index in ``Recording.derived``
    sources: frozenset[str]


@dataclass
class Recording:
    """The uses of one forward, in call order, and why some parameters could not be recorded."""

    uses: list[Use] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # every differentiated parameter, in the model's order
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # and its shape
    plain: list[Use] = field(default_factory=list)  # the uses whose own output the backward differentiates
    derived: list[Tensor] = field(default_factory=list)  # the derived operands, their graphs kept
    leaves: dict[str, Tensor] = field(default_factory=dict)  # the differentiated parameters as the forward saw them
    # Parameters no call recorded whose gradient the backward was also asked for (``probed``), and those of them the
    # loss does not reach at all (``unreached``: an unused head, a branch these examples do not take): their
    # per-example gradients are zero, proven by autograd rather than inferred from the absence of a call (an operation
    # the recorder cannot see, a custom autograd Function, may still use them).
    probed: list[str] = field(default_factory=list)
    unreached: set[str] = field(default_factory=set)


def _torch_functional_names() -> dict[str, Callable[..., Any]]:
    """``torch.nn.functional`` names of functions with a rule (what its Python functions call internally)."""
    return {name: fn for name, fn in vars(F).items() if callable(fn) and fn in OP_RULES}


#: Operations that run a whole recurrent network: left to the exact whole-model fallback (see ``OperationVjp``).
_RECURRENT = {getattr(torch, name) for name in ("lstm", "gru", "rnn_tanh", "rnn_relu") if hasattr(torch, name)}


def _is_inplace(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("_")) or name.startswith("__i")


def _tensors(values: Any) -> list[Tensor]:
    """The tensors among an operation's arguments (nested in tuples, lists and dicts): run on every operation of the
    forward, so plain recursion rather than a general pytree flatten, several times slower."""
    if isinstance(values, Tensor):
        return [values]
    if isinstance(values, (tuple, list)):
        return [t for value in values for t in _tensors(value)]
    if isinstance(values, dict):
        return [t for value in values.values() for t in _tensors(value)]
    return []


class _Recorder(TorchFunctionMode):
    """Records the calls that use differentiated parameters, and follows which tensors carry the examples.

    A tensor carries the examples when it is an input or target, or an operation's result with such an argument
    (in place included). A tensor computed from parameters and no example is *derived*: the call where it meets
    the examples is recorded with it as an operand, and its gradient goes back to its parameters from there.
    """

    def __init__(self, tracked: dict[int, str], recording: Recording, count: int) -> None:
        super().__init__()
        self.count = count
        self.tracked = tracked
        self.recording = recording
        self.enabled = True
        self.examples: dict[int, weakref.ref] = {}
        self.derived: dict[int, tuple[weakref.ref, frozenset[str]]] = {}

    def mark_examples(self, values: Any) -> None:
        for tensor in _tensors(values):
            self.examples[id(tensor)] = weakref.ref(tensor)
            self.derived.pop(id(tensor), None)

    def carries_examples(self, value: Any) -> bool:
        ref = self.examples.get(id(value))
        return ref is not None and ref() is value

    def sources(self, value: Any) -> frozenset[str]:
        """The differentiated parameters a derived tensor (or a parameter) is computed from; empty for others."""
        where = self.slice_of(value)
        if where is not None:
            return frozenset((where.name,))
        entry = self.derived.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else frozenset()

    def slice_of(self, value: Any) -> ParamSlice | None:
        """The parameter (or dim-0 slice of one, or its transpose) ``value`` is, if any."""
        if not isinstance(value, Tensor):
            return None
        name = self.tracked.get(id(value))
        if name is not None:
            return ParamSlice(name)
        base = value._base
        name = self.tracked.get(id(base)) if base is not None else None
        if base is None or name is None or value.dim() != base.dim() or value.dim() == 0:
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

    def _follow(self, func: Callable[..., Any], args: tuple, kwargs: dict, output: Any) -> None:
        """Mark ``output`` (and an argument changed in place) as carrying examples, or as derived."""
        arguments = _tensors((args, kwargs))
        results = _tensors(output)
        if _is_inplace(func) and arguments:
            results.append(arguments[0])
        if any(self.carries_examples(t) for t in arguments):
            self.mark_examples(results)
            return
        sources = frozenset().union(*(self.sources(t) for t in arguments))
        if sources:
            for result in results:
                if result.requires_grad and id(result) not in self.tracked:
                    self.derived[id(result)] = (weakref.ref(result), sources)

    def _operands(self, rule: OpRule, bound: dict[str, Any]) -> tuple[dict[str, ParamSlice], dict[str, Derived]]:
        params, derived = {}, {}
        for role in rule.roles:
            value = bound.get(role)
            where = self.slice_of(value)
            if where is not None:
                params[role] = where
            elif isinstance(value, Tensor) and self.sources(value):
                self.recording.derived.append(value)
                derived[role] = Derived(len(self.recording.derived) - 1, self.sources(value))
        return params, derived

    def record(self, func: Callable[..., Any], args: tuple, kwargs: dict, inside: bool = False) -> Any:
        """Call ``func`` and record the call when it uses a parameter or meets the examples with a derived operand.

        ``inside``: called by a Python-level torch function the mode does not see into, whose tensors are not
        followed: a call with a parameter is recorded as one that meets the examples.
        """
        output = func(*args, **kwargs)
        arguments = _tensors((args, kwargs))
        meets = inside or self._expands_over_examples(func, args, output) or any(map(self.carries_examples, arguments))
        if not meets or not any(self.sources(t) for t in arguments):
            return output
        rule = OP_RULES[func]
        bound = rule.bind(args, kwargs)
        if bound is None and rule.own_vjp:  # settings with no factored form (a 3-operand einsum): its own vjp
            return self.record_operation(func, args, kwargs, output)
        if bound is None:
            for value in arguments:
                for name in self.sources(value):
                    why = f"{_qualified(func)} with {rule.uncovered}"
                    self.recording.unsupported[name] = why
            return output
        params, derived = self._operands(rule, bound)
        if (params or derived) and isinstance(output, Tensor) and output.requires_grad:
            use = Use(rule, bound, params, output, output._version, derived=derived, op=_qualified(func))
            self.recording.uses.append(use)
        return output

    def record_operation(self, func: Callable[..., Any], args: tuple, kwargs: dict, output: Any = None) -> Any:
        """Call ``func`` (unless its ``output`` is given), an operation without a rule; where it meets the examples
        with a parameter or derived operand, record it for a vector-Jacobian product of its own (``OperationVjp``)."""
        output = func(*args, **kwargs) if output is None else output
        if func in _RECURRENT or not isinstance(output, Tensor) or not output.requires_grad:
            return output
        bound = OPERATION_VJP.bind(args, kwargs)
        leaves = bound["leaves"]
        if not any(self.carries_examples(leaf) for leaf in leaves if isinstance(leaf, Tensor)):
            return output
        params, derived = {}, {}
        for index, leaf in enumerate(leaves):
            role = f"operand{index}"
            where = self.slice_of(leaf)
            if where is not None and not where.transposed and where.rows is None:
                params[role] = where
            elif isinstance(leaf, Tensor) and self.sources(leaf):
                self.recording.derived.append(leaf)
                derived[role] = Derived(len(self.recording.derived) - 1, self.sources(leaf))
        if params or derived:
            bound.update(func=func, inplace=_is_inplace(func), result=output.detach())  # its shape, for the layout
            use = Use(OPERATION_VJP, bound, params, output, output._version, derived=derived, op=_qualified(func))
            self.recording.uses.append(use)
        return output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        if func in OP_RULES:
            output = self.record(func, args, kwargs)
        elif getattr(func, "__module__", None) == F.__name__ and self._touches(args, kwargs):
            before = len(self.recording.uses)
            with self._inside_functional():
                output = func(*args, **kwargs)
            if len(self.recording.uses) == before:  # no ruled call inside (F.prelu): the function as one operation
                self.record_operation(func, args, kwargs, output)
        elif any(self.sources(t) for t in _tensors((args, kwargs))):
            output = self.record_operation(func, args, kwargs)
        else:
            output = func(*args, **kwargs)
        self._follow(func, args, kwargs, output)
        if self._expands_over_examples(func, args, output):
            self.mark_examples(output)
        return output

    def _expands_over_examples(self, func: Callable[..., Any], args: tuple, output: Any) -> bool:
        """Whether the call expands or tiles a tensor over the examples (``cls_token.expand(N, -1, -1)``, a buffer of
        token type ids expanded to [N, T], DeBERTa's position keys ``.repeat(N, 1, 1)``): a dimension of the batch's
        size where the tensor had size 1 or none, or repeated as many times as there are examples."""
        if func is not Tensor.repeat and func is not Tensor.expand:
            return False
        # Every call the mode sees comes here; a call with keyword arguments only (``F.linear(input=x, weight=w)``,
        # ``torch.zeros(size=(3,))``) has no args[0].
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
            return False
        if func is Tensor.repeat:  # tiled: each example gets one copy (DeBERTa's relative position keys)
            return self.count in size_arguments(args)
        source = args[0]
        offset = output.dim() - source.dim()
        return any(
            size == self.count and (dim < offset or source.shape[dim - offset] == 1)
            for dim, size in enumerate(output.shape)
        )

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
        if not any(recorder.slice_of(value) is not None for value in _tensors((args, kwargs))):
            return fn(*args, **kwargs)
        return recorder.record(fn, args, kwargs, inside=True)

    return call


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _qualified(func: Callable[..., Any]) -> str:
    """``F.linear``, ``Tensor.__add__``, ``torch.matmul``: the operation as a user writes it."""
    name = _name(func)
    qualname = getattr(func, "__qualname__", "") or ""
    if qualname.startswith(("Tensor.", "TensorBase.", "_TensorBase.")):
        return f"Tensor.{name}"
    if getattr(F, name, None) is func:
        return f"F.{name}"
    return f"torch.{name}" if getattr(torch, name, None) is func else name


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
                use = Use(rule, bound, slices, output, output._version, module=mod, op=type(mod).__name__)
                recording.uses.append(use)
            else:
                for full in params.values():
                    recording.unsupported[full] = "its module was called without one tensor input and output"

        return hook

    handles = [
        module.register_forward_hook(hook_for(name), with_kwargs=True) for name, (module, _, _) in module_rules.items()
    ]
    recorder = _Recorder(tracked, recording, targets.shape[0])
    recorder.mark_examples((inputs, targets))
    recording.leaves = leaves

    def differentiate_after_forward() -> tuple[list[Tensor], bool]:
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


def _backward_targets(recording: Recording, leaves: dict[str, Tensor]) -> tuple[list[Tensor], bool]:
    """What the backward differentiates: each use's output, or, for an output written in place after its call (by
    ``ReLU(inplace=True)``), its parameters, so that the hook registered at the call sees the output's gradient."""
    plain = [use for use in recording.uses if use.output._version == use.version]
    modified = [use for use in recording.uses if use.output._version != use.version]
    through = list({name: leaves[name] for use in modified for name in use.names}.values())
    recording.plain = plain
    used = {name for use in recording.uses for name in use.names}
    recording.probed = [name for name in leaves if name not in used and name not in recording.unsupported]
    probed = [leaves[name] for name in recording.probed]
    # A derived operand's per-example gradients go back to its parameters through its graph, after this backward.
    return [use.output for use in plain] + through + probed, bool(recording.derived)


def _assign_backprops(recording: Recording, grads: tuple[Tensor | None, ...]) -> None:
    """Fill each use's ``backprop``: the gradient of the summed loss with respect to its output; and the probed
    parameters the loss does not reach."""
    if recording.probed:
        tail = grads[len(grads) - len(recording.probed) :]
        recording.unreached = {name for name, grad in zip(recording.probed, tail, strict=True) if grad is None}
    for use, grad in zip(recording.plain, grads, strict=False):
        use.backprop = grad.detach() if grad is not None else None
    for use in recording.uses:
        if use.backprop is None:
            use.backprop = use.hooked if use.hooked is not None else torch.zeros_like(use.output)
        use.output = use.output.detach()
