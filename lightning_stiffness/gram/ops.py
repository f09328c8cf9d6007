"""Factored rules per operation: whatever calls ``F.linear``, ``F.conv1d/2d``, ``F.embedding``, the norms, or adds,
multiplies or expands a parameter, whichever module does it.

An operation rule sees one call (a *use*) of a parameter: the call's arguments and the gradient of the summed loss
with respect to its output. It says which dimension of its batched argument can hold the examples, and turns the call
into :class:`Factors` of each parameter it uses, with the examples along dim 0:

- :class:`Positions`: a weight applied at T positions of each example, g_i = sum_t b_it a_it^T (``F.linear`` on
  vectors (T = 1), on sequences, or on anything with extra dimensions; convolutions through unfolded patches);
- :class:`Rows`: per-example gradients formed directly, one row per example (biases, norm affines, a parameter added
  to, multiplied with or expanded over the examples);
- :class:`Tokens`: an embedding table, g_i = sum_t onehot(id_it) b_it^T.

The engine (:mod:`.factored`) sums a parameter's uses (tied weights, a block applied twice, packed projections
split into slices) and the per-example check (:mod:`.check`) proves every result before it is used. To cover a new
function, write a subclass of :class:`OpRule` and register it with :func:`register_op_rule`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_stiffness.gram.terms import LazyPositions


@dataclass
class Positions:
    """g_i = sum_t b_it a_it^T: activations [N, T, d] (or lazily formed patches) and output gradients [N, T, p]."""

    activations: Tensor | LazyPositions
    backprops: Tensor


@dataclass
class Rows:
    """Per-example gradients as rows [N, numel]."""

    rows: Tensor


@dataclass
class Tokens:
    """An embedding table's per-example gradients, sum_t onehot(ids_it) b_it^T: ids [N, T], backprops [N, T, d]."""

    ids: Tensor
    backprops: Tensor
    num_embeddings: int


Factors = Positions | Rows | Tokens


class OpRule:
    """How one torch function's parameter uses become factors.

    Attributes:
        roles: the names of the arguments that can be parameters (``"weight"``, ``"bias"``, ...).
        batched: for rules that apply the same map at every leading index of an argument (``F.linear``,
            ``F.embedding``, ``F.layer_norm``), that argument's name; their examples may also be found inside a
            leading dimension that flattens them with other positions ([N * T, d] or [T * N, d]).
    """

    roles: tuple[str, ...] = ()
    batched: str | None = None

    def leading_dims(self, bound: dict[str, Any]) -> range:
        """The dimensions of the ``batched`` argument the map is applied over (where examples may be flattened)."""
        return range(0)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """The call's arguments by name, or None when the call has settings this rule does not cover."""
        raise NotImplementedError

    def example_dims(self, bound: dict[str, Any], output: Tensor, count: int, roles: frozenset[str]) -> list[int]:
        """The dimensions that can hold ``count`` examples (of the tensor :meth:`factors` indexes by example).

        ``roles`` are the arguments that hold differentiated parameters (the others are activations or constants).
        """
        raise NotImplementedError

    def factors(
        self, bound: dict[str, Any], output: Tensor, backprop: Tensor, dim: int, roles: frozenset[str]
    ) -> dict[str, Factors]:
        """Factors of each role in ``roles``, the examples along ``dim`` moved to dim 0."""
        raise NotImplementedError


#: torch function -> its rule.
OP_RULES: dict[Callable[..., Any], OpRule] = {}


def register_op_rule(*functions: Callable[..., Any]) -> Callable[[type[OpRule]], type[OpRule]]:
    """Class decorator: register an :class:`OpRule` subclass for ``functions``."""

    def decorator(cls: type[OpRule]) -> type[OpRule]:
        rule = cls()
        for function in functions:
            OP_RULES[function] = rule
        return cls

    return decorator


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _dims_of_size(shape: torch.Size, dims: range, count: int) -> list[int]:
    return [dim for dim in dims if shape[dim] == count]


def _examples_first(tensor: Tensor, dim: int, trailing: int) -> Tensor:
    """[N, T, *trailing dims]: the examples along ``dim`` first, every other leading dimension flattened into T."""
    moved = tensor.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1, *moved.shape[moved.dim() - trailing :])


@register_op_rule(F.linear)
class LinearRule(OpRule):
    roles = ("weight", "bias")
    batched = "input"

    def leading_dims(self, bound):
        return range(bound["input"].dim() - 1)

    def bind(self, args, kwargs):
        return _bind(("input", "weight", "bias"), {"bias": None}, args, kwargs)

    def example_dims(self, bound, output, count, roles):
        x = bound["input"]
        return _dims_of_size(x.shape, range(x.dim() - 1), count)

    def factors(self, bound, output, backprop, dim, roles):
        grads = _examples_first(backprop, dim, 1)
        out: dict[str, Factors] = {"weight": Positions(_examples_first(bound["input"].detach(), dim, 1), grads)}
        out["bias"] = Rows(grads.sum(dim=1))
        return out


def _explicit_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """Integer padding per dimension; ``"same"`` only where it pads both sides alike; None otherwise."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return padding


@register_op_rule(F.conv1d, F.conv2d)
class ConvolutionRule(OpRule):
    roles = ("weight", "bias")

    def bind(self, args, kwargs):
        bound = _bind(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
            args,
            kwargs,
        )
        spatial = bound["weight"].dim() - 2
        for key in ("stride", "dilation", "padding"):
            value = bound[key]
            if isinstance(value, int):
                bound[key] = (value,) * spatial
            elif not isinstance(value, str):
                bound[key] = tuple(value)
        bound["padding"] = _explicit_padding(bound["padding"], bound["weight"].shape[2:], bound["dilation"])
        # Groups change how patches map to weights: left to the exact fallback.
        return bound if bound["groups"] == 1 and bound["padding"] is not None else None

    def example_dims(self, bound, output, count, roles):
        x = bound["input"]
        batched = x.dim() == bound["weight"].dim()
        return [0] if batched and x.shape[0] == count else []

    def factors(self, bound, output, backprop, dim, roles):
        weight = bound["weight"]
        source = bound["input"].detach()
        if weight.dim() == 3:  # conv1d as a conv2d of height 1
            source = source.unsqueeze(2)
            kernel, dilation = (1, weight.shape[2]), (1, bound["dilation"][0])
            padding, stride = (0, bound["padding"][0]), (1, bound["stride"][0])
        else:
            kernel, dilation, padding, stride = weight.shape[2:], bound["dilation"], bound["padding"], bound["stride"]

        def patches(x: Tensor) -> Tensor:  # [n, T, C_in * prod(kernel)], in the order of the flattened weight
            return F.unfold(x, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)

        grads = backprop.reshape(backprop.shape[0], backprop.shape[1], -1).transpose(1, 2)  # [N, T, C_out]
        return {"weight": Positions(LazyPositions(source, patches), grads), "bias": Rows(grads.sum(dim=1))}


@register_op_rule(F.embedding)
class EmbeddingRule(OpRule):
    roles = ("weight",)
    batched = "input"

    def leading_dims(self, bound):
        return range(bound["input"].dim())

    def bind(self, args, kwargs):
        bound = _bind(
            ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
            {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False},
            args,
            kwargs,
        )
        # max_norm rewrites the table in place; scale_grad_by_freq couples the examples through token counts.
        return None if bound["max_norm"] is not None or bound["scale_grad_by_freq"] else bound

    def example_dims(self, bound, output, count, roles):
        ids = bound["input"]
        return _dims_of_size(ids.shape, range(ids.dim()), count)

    def factors(self, bound, output, backprop, dim, roles):
        ids = bound["input"].movedim(dim, 0)
        ids = ids.reshape(ids.shape[0], -1)
        grads = _examples_first(backprop, dim, 1)
        padding = bound["padding_idx"]
        num_embeddings = bound["weight"].shape[0]
        if padding is not None:  # the padding row gets no gradient
            padding = padding % num_embeddings
            grads = grads.masked_fill((ids == padding).unsqueeze(-1), 0)
        return {"weight": Tokens(ids, grads, num_embeddings)}


def _affine_rows(normalised: Tensor, backprop: Tensor, dim: int, trailing: int) -> dict[str, Factors]:
    """Weight and bias rows of ``normalised * weight + bias`` applied over the last ``trailing`` dimensions."""
    weight = _examples_first(backprop * normalised, dim, trailing).sum(dim=1)
    bias = _examples_first(backprop, dim, trailing).sum(dim=1)
    return {"weight": Rows(weight.reshape(weight.shape[0], -1)), "bias": Rows(bias.reshape(bias.shape[0], -1))}


@register_op_rule(F.layer_norm)
class LayerNormRule(OpRule):
    roles = ("weight", "bias")
    batched = "input"

    def leading_dims(self, bound):
        return range(bound["input"].dim() - len(bound["normalized_shape"]))

    def bind(self, args, kwargs):
        return _bind(
            ("input", "normalized_shape", "weight", "bias", "eps"),
            {"weight": None, "bias": None, "eps": 1e-5},
            args,
            kwargs,
        )

    def example_dims(self, bound, output, count, roles):
        x = bound["input"]
        return _dims_of_size(x.shape, range(x.dim() - len(bound["normalized_shape"])), count)

    def factors(self, bound, output, backprop, dim, roles):
        shape = tuple(bound["normalized_shape"])
        normalised = F.layer_norm(bound["input"].detach(), shape, eps=bound["eps"])
        return _affine_rows(normalised, backprop, dim, len(shape))


def _channels_last(tensor: Tensor) -> Tensor:
    """[N, C, *spatial] -> [N, *spatial, C], so that channels are the trailing (parameter) dimension."""
    return tensor.movedim(1, -1)


@register_op_rule(F.group_norm)
class GroupNormRule(OpRule):
    roles = ("weight", "bias")

    def bind(self, args, kwargs):
        return _bind(
            ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs
        )

    def example_dims(self, bound, output, count, roles):
        x = bound["input"]
        return [0] if x.dim() >= 2 and x.shape[0] == count else []

    def factors(self, bound, output, backprop, dim, roles):
        normalised = F.group_norm(bound["input"].detach(), bound["num_groups"], eps=bound["eps"])
        return _affine_rows(_channels_last(normalised), _channels_last(backprop), 0, 1)


@register_op_rule(F.batch_norm)
class BatchNormRule(OpRule):
    """Batch normalisation with running statistics (eval mode): a fixed per-channel affine map."""

    roles = ("weight", "bias")

    def bind(self, args, kwargs):
        bound = _bind(
            ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            {"weight": None, "bias": None, "training": False, "eps": 1e-5},
            args,
            kwargs,
        )
        return None if bound["training"] or bound["running_mean"] is None else bound

    def example_dims(self, bound, output, count, roles):
        x = bound["input"]
        return [0] if x.dim() >= 2 and x.shape[0] == count else []

    def factors(self, bound, output, backprop, dim, roles):
        x = bound["input"].detach()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalised = (x - bound["running_mean"].reshape(shape)) * torch.rsqrt(
            bound["running_var"].reshape(shape) + bound["eps"]
        )
        return _affine_rows(_channels_last(normalised), _channels_last(backprop), 0, 1)


class _BroadcastRule(OpRule):
    """A parameter broadcast over the examples: added to them, multiplied with them, or expanded over them.

    The examples' dimension is one of the output's where the parameter has size 1 (or no dimension at all), so each
    example's gradient is the output gradient of its slice, times the other operand for a product, summed down to
    the parameter's shape.
    """

    def _parameters(self, bound: dict[str, Any], roles: frozenset[str]) -> dict[str, Tensor]:
        return {role: bound[role] for role in self.roles if role in roles and isinstance(bound.get(role), Tensor)}

    def example_dims(self, bound, output, count, roles):
        dims = []
        for dim in range(output.dim()):
            if output.shape[dim] != count:
                continue
            offset = output.dim() - dim  # the parameter's dimension aligned with `dim`, counted from the end
            if all(p.dim() < offset or p.shape[p.dim() - offset] == 1 for p in self._parameters(bound, roles).values()):
                dims.append(dim)
        return dims

    def _reduced(self, grad: Tensor, parameter: Tensor, dim: int) -> Rows:
        aligned = [1] * (grad.dim() - parameter.dim()) + list(parameter.shape)
        aligned[dim] = grad.shape[dim]
        per_example = grad.sum_to_size(aligned).movedim(dim, 0)
        return Rows(per_example.reshape(per_example.shape[0], -1))


@register_op_rule(torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, torch.sub, Tensor.sub, Tensor.__sub__)
class AddRule(_BroadcastRule):
    roles = ("input", "other")

    def bind(self, args, kwargs):
        bound = _bind(("input", "other", "alpha"), {"alpha": 1}, args, kwargs)
        return bound if isinstance(bound["input"], Tensor) else None

    def factors(self, bound, output, backprop, dim, roles):
        sign = -1.0 if output.grad_fn is not None and "Sub" in type(output.grad_fn).__name__ else 1.0
        out = {}
        for role, parameter in self._parameters(bound, roles).items():
            scale = 1.0 if role == "input" else sign * bound["alpha"]
            out[role] = self._reduced(backprop * scale, parameter, dim)
        return out


@register_op_rule(torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)
class MulRule(_BroadcastRule):
    roles = ("input", "other")

    def bind(self, args, kwargs):
        return _bind(("input", "other"), {}, args, kwargs)

    def factors(self, bound, output, backprop, dim, roles):
        out = {}
        for role, parameter in self._parameters(bound, roles).items():
            other = bound["other" if role == "input" else "input"]
            other = other.detach() if isinstance(other, Tensor) else other
            out[role] = self._reduced(backprop * other, parameter, dim)
        return out


@register_op_rule(Tensor.expand)
class ExpandRule(_BroadcastRule):
    roles = ("input",)

    def bind(self, args, kwargs):
        sizes = args[1:]
        if len(sizes) == 1 and not isinstance(sizes[0], int):
            sizes = tuple(sizes[0])
        return {"input": args[0], "sizes": sizes}

    def factors(self, bound, output, backprop, dim, roles):
        return {"input": self._reduced(backprop, bound["input"], dim)}


def rows_per_example(factors: Factors) -> Tensor:
    """Per-example gradients [N, numel] of one use's factors (for the per-example check and mixed uses)."""
    if isinstance(factors, Rows):
        return factors.rows
    if isinstance(factors, Positions):
        a = factors.activations
        return torch.bmm(factors.backprops.transpose(1, 2), a[0 : a.shape[0]]).reshape(a.shape[0], -1)
    n, d = factors.ids.shape[0], factors.backprops.shape[-1]
    out = factors.backprops.new_zeros(n, factors.num_embeddings, d)
    out.scatter_add_(1, factors.ids.unsqueeze(-1).expand(-1, -1, d), factors.backprops)
    return out.reshape(n, -1)


def factors_numel(factors: Factors) -> int:
    """The number of parameter entries a use's per-example gradient has."""
    if isinstance(factors, Rows):
        return factors.rows.shape[1]
    if isinstance(factors, Positions):
        return factors.activations.shape[2] * factors.backprops.shape[2]
    return factors.num_embeddings * factors.backprops.shape[-1]


__all__ = [
    "OP_RULES",
    "Factors",
    "OpRule",
    "Positions",
    "Rows",
    "Tokens",
    "factors_numel",
    "register_op_rule",
    "rows_per_example",
]
