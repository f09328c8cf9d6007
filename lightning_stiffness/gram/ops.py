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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

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
        items: for rules that compute each index of an argument's dim 0 on its own (convolutions, batch and group
            normalisation), that argument's name: the examples may also be flattened with other positions into
            that dimension (the frames of videos folded into the batch, [N * T, C, H, W]); each example's
            gradient is then the sum of its items' (:func:`fold_items`).
        uncovered: what :meth:`bind` refuses, for the plan's reason when it returns None.
        own_vjp: whether a call :meth:`bind` refuses may still get its per-example gradients from its own
            vector-Jacobian product (:class:`OperationVjp`): not where recomputing the call would write to the
            parameter (a ``max_norm`` embedding) or its gradient depends on the whole batch (``scale_grad_by_freq``).
    """

    roles: tuple[str, ...] = ()
    batched: str | None = None
    items: str | None = None
    uncovered: str = "settings its rule does not cover"
    own_vjp: bool = True

    def leading_dims(self, bound: dict[str, Any]) -> range:
        """The dimensions of the ``batched`` argument the map is applied over (where examples may be flattened)."""
        return range(0)

    def flattened(self, bound: dict[str, Any], output: Tensor, roles: frozenset[str]) -> tuple[str, list[int]] | None:
        """The argument whose leading dimensions may flatten the examples with other positions, and those
        dimensions (the same index in the output); None when the examples must have a dimension of their own."""
        if self.batched is not None:
            return self.batched, list(self.leading_dims(bound))
        return (self.items, [0]) if self.items is not None else None

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


def _explicit_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per spatial dimension; ``"same"`` pads the odd element after, as torch does."""
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in padding)


def _padded(x: Tensor, padding: tuple) -> Tensor:
    """``x`` [n, C, *spatial] zero-padded by explicit (before, after) pairs per spatial dimension, as a convolution
    pads it."""
    pads = [side for before_after in reversed(padding) for side in before_after]
    return F.pad(x, pads) if any(pads) else x


def conv_patches(
    x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple, dilation: tuple[int, ...]
) -> Tensor:
    """The patches a convolution's kernel meets: [n, C_in, *spatial] -> [n, L, C_in * prod(kernel)] (L output
    positions), each patch ordered as the weight [C_out, C_in, *kernel] is flattened, for any number of spatial
    dimensions (``F.unfold`` takes two)."""
    x = _padded(x, padding)
    spatial = len(kernel)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation, strict=True)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # the window appended as a last dimension
        if d > 1:
            x = x[..., ::d]
    n, c = x.shape[:2]
    # [n, C, *out, *kernel] -> [n, *out, C, *kernel]
    x = x.permute(0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
    return x.reshape(n, -1, c * math.prod(kernel))


def conv_weight_per_example(
    x: Tensor,
    grads: Tensor,
    weight_shape: torch.Size,
    stride: tuple[int, ...],
    padding: tuple,
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """Per-example weight gradients of a convolution [n, numel], from its input [n, C_in, *spatial] and its output
    gradients [n, L, C_out] (L output positions), by the convolution's own weight backward.

    The n examples become n groups of one convolution (input [1, n C_in, ...], output gradients [1, n C_out, ...],
    n * groups groups), so the backward sums over each example's positions only (Rochette, Manoel and Tramel,
    "Efficient per-example gradient computations in convolutional neural networks", 2019). No patches are formed.
    """
    x = _padded(x, padding)
    n, c_out, spatial = x.shape[0], weight_shape[0], len(weight_shape) - 2
    out_shape = _conv_output_shape(x.shape[2:], weight_shape[2:], stride, dilation)
    grad_output = grads.transpose(1, 2).reshape(1, n * c_out, *out_shape)
    weight = x.new_empty(()).expand(n * c_out, *weight_shape[1:])  # its shape only: no memory
    _, rows, _ = torch.ops.aten.convolution_backward(
        grad_output.contiguous(),
        x.reshape(1, -1, *x.shape[2:]),
        weight,
        None,
        list(stride),
        [0] * spatial,
        list(dilation),
        False,
        [0] * spatial,
        n * groups,
        [False, True, False],
    )
    return rows.reshape(n, -1)


def _conv_output_shape(size, kernel, stride, dilation) -> tuple[int, ...]:
    return tuple((s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(size, kernel, stride, dilation, strict=True))


#: An ungrouped convolution's per-example gradients come from its own weight backward rather than its patches from
#: this many output positions on, or at any number for at most :data:`CONV_BACKWARD_CHANNELS` input channels. Measured
#: on 2 CPU cores (N = 64 and 512, 3x3 kernels): the backward took 0.1-0.8x the time of unfolded patches times output
#: gradients from 8 x 8 positions on and with up to 32 input channels at 4 x 4 to 7 x 7; with 64-256 channels below
#: 8 x 8 positions it took up to 2.4x.
CONV_BACKWARD_POSITIONS = 64
CONV_BACKWARD_CHANNELS = 32

#: Entries of a grouped convolution's weight up to which its per-example gradients are formed directly (one product
#: per group); above, each group's positions become positions of the whole weight, with zeros outside its block.
GROUPED_ROWS_NUMEL = 1 << 20


@register_op_rule(F.conv1d, F.conv2d, F.conv3d)
class ConvolutionRule(OpRule):
    """Convolutions of any dimension, stride, padding, dilation and groups (grouped and depthwise included).

    g_i = sum_l b_il patch_il^T over the L output positions (Grosse and Martens, "A Kronecker-factored approximate
    Fisher matrix for convolution layers", 2016, eq. 6): with groups, output channels of group j meet the patches of
    input channels of group j only.
    """

    roles = ("weight", "bias")
    items = "input"

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
        return bound

    def example_dims(self, bound, output, count, roles):
        x = bound["input"]
        batched = x.dim() == bound["weight"].dim()
        return [0] if batched and x.shape[0] == count else []

    def factors(self, bound, output, backprop, dim, roles):
        weight, groups = bound["weight"], bound["groups"]
        kernel = tuple(weight.shape[2:])

        def patches(x: Tensor) -> Tensor:
            return conv_patches(x, kernel, bound["stride"], bound["padding"], bound["dilation"])

        def gradients(x: Tensor, grads: Tensor) -> Tensor:
            return conv_weight_per_example(
                x, grads, weight.shape, bound["stride"], bound["padding"], bound["dilation"], groups
            )

        source = bound["input"].detach()
        grads = backprop.reshape(backprop.shape[0], backprop.shape[1], -1).transpose(1, 2)  # [N, L, C_out]
        out: dict[str, Factors] = {"bias": Rows(grads.sum(dim=1))}
        n, length, c_out = grads.shape
        if groups == 1:
            backward = length >= CONV_BACKWARD_POSITIONS or weight.shape[1] <= CONV_BACKWARD_CHANNELS
            formed = gradients if backward else None
            out["weight"] = Positions(LazyPositions(source, patches, formed), grads)
            return out
        if weight.numel() <= GROUPED_ROWS_NUMEL:
            # Depthwise and grouped: the backward beat the patches' per-group products at every size measured
            # (0.15-0.8x, 7x7 depthwise kernels on 2 CPU cores), and its rows are the weight's, in its order.
            out["weight"] = Rows(gradients(source, grads))
            return out

        def group_positions(x: Tensor) -> Tensor:  # [n, L * groups, C_in / groups * prod(kernel)]
            p = patches(x)
            return p.reshape(p.shape[0], -1, p.shape[2] // groups)

        # Position (l, j) carries group j's output gradient in its block of C_out and zeros elsewhere.
        blocks = grads.new_zeros(n, length, groups, groups, c_out // groups)
        blocks.diagonal(dim1=2, dim2=3).copy_(grads.reshape(n, length, groups, c_out // groups).transpose(2, 3))
        out["weight"] = Positions(LazyPositions(source, group_positions), blocks.reshape(n, length * groups, c_out))
        return out


@register_op_rule(F.embedding)
class EmbeddingRule(OpRule):
    roles = ("weight",)
    batched = "input"
    uncovered = "max_norm (renormalises the table in place) or scale_grad_by_freq (scales by the batch's counts)"
    own_vjp = False

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
    items = "input"

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
    items = "input"

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


def reduced_rows(grad: Tensor, parameter: Tensor, dim: int) -> Rows:
    """Per-example gradients of a ``parameter`` broadcast against ``grad`` (its output gradient, or that times the
    other factor), the examples along ``dim`` of ``grad``: each example's slice summed down to the parameter's shape."""
    aligned = [1] * (grad.dim() - parameter.dim()) + list(parameter.shape)
    aligned[dim] = grad.shape[dim]
    per_example = grad.sum_to_size(aligned).movedim(dim, 0)
    return Rows(per_example.reshape(per_example.shape[0], -1))


class _BroadcastRule(OpRule):
    """A parameter broadcast over the examples: added to them, multiplied with them, or expanded over them.

    The examples' dimension is one of the output's where the parameter has size 1 (or no dimension at all), or
    inside one of them, flattened with other positions (a table of relative position biases added to the scores of
    [N * windows, heads, T, T]), so each example's gradient is the output gradient of its slice, times the other
    operand for a product, summed down to the parameter's shape.
    """

    def _parameters(self, bound: dict[str, Any], roles: frozenset[str]) -> dict[str, Tensor]:
        return {role: bound[role] for role in self.roles if role in roles and isinstance(bound.get(role), Tensor)}

    def _broadcast_dims(self, bound: dict[str, Any], output: Tensor, roles: frozenset[str]) -> list[int]:
        """The output's dimensions over which every parameter operand is broadcast."""
        parameters = self._parameters(bound, roles).values()
        dims = []
        for dim in range(output.dim()):
            offset = output.dim() - dim  # the parameter's dimension aligned with `dim`, counted from the end
            if all(p.dim() < offset or p.shape[p.dim() - offset] == 1 for p in parameters):
                dims.append(dim)
        return dims

    def example_dims(self, bound, output, count, roles):
        return [dim for dim in self._broadcast_dims(bound, output, roles) if output.shape[dim] == count]

    def flattened(self, bound, output, roles):
        # The operand that carries the examples, unflattened with the output along a dimension where both have the
        # output's size (it may be broadcast along others: a [N * windows, 1, T, T] mask beside [1, H, T, T] biases).
        for role in self.roles:
            value = bound.get(role)
            if role not in roles and isinstance(value, Tensor) and value.dim() == output.dim():
                dims = [d for d in self._broadcast_dims(bound, output, roles) if value.shape[d] == output.shape[d]]
                if dims:
                    return role, dims
        return None

    def _reduced(self, grad: Tensor, parameter: Tensor, dim: int) -> Rows:
        return reduced_rows(grad, parameter, dim)


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


def size_arguments(args: tuple) -> tuple[int, ...]:
    """The sizes of ``Tensor.expand`` or ``Tensor.repeat``, given as ``x.repeat(2, 3)`` or ``x.repeat((2, 3))``."""
    sizes = args[1:]
    return tuple(sizes[0]) if len(sizes) == 1 and not isinstance(sizes[0], int) else tuple(sizes)


@register_op_rule(Tensor.expand)
class ExpandRule(_BroadcastRule):
    roles = ("input",)

    def bind(self, args, kwargs):
        return {"input": args[0], "sizes": size_arguments(args)}

    def factors(self, bound, output, backprop, dim, roles):
        return {"input": self._reduced(backprop, bound["input"], dim)}


@register_op_rule(Tensor.repeat)
class RepeatRule(OpRule):
    """A parameter (or a tensor computed from parameters) tiled over the examples: ``x.repeat(N, 1, 1)``, as
    DeBERTa tiles its [heads, 2k, d] relative position keys to [N * heads, 2k, d] beside the queries.

    The examples are the repeats of one dimension (each example's copy of ``x`` is one block of it), so each
    example's gradient is the output gradient of its block, summed over the other dimensions' repeats.
    """

    roles = ("input",)

    def bind(self, args, kwargs):
        return {"input": args[0], "sizes": size_arguments(args)} if not kwargs else None

    def example_dims(self, bound, output, count, roles):
        return [dim for dim, repeats in enumerate(bound["sizes"]) if repeats == count]

    def factors(self, bound, output, backprop, dim, roles):
        sizes, x = bound["sizes"], bound["input"]
        shape = [1] * (len(sizes) - x.dim()) + list(x.shape)
        tiles = backprop.reshape([part for r, s in zip(sizes, shape, strict=True) for part in (r, s)])
        per_example = tiles.movedim(2 * dim, 0)
        # The other repeats' axes, 2 d in ``tiles``, one further on before ``dim``'s (moved to the front).
        others = [2 * d + (d < dim) for d in range(len(sizes)) if d != dim]
        per_example = per_example.sum(dim=others) if others else per_example
        return {"input": Rows(per_example.reshape(per_example.shape[0], -1))}


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _matmul_subscripts(left: int, right: int) -> tuple[str, str, str]:
    """``torch.matmul``'s contraction of operands with ``left`` and ``right`` dimensions, as einsum subscripts."""
    if left == 1 and right == 1:
        return "k", "k", ""
    if left == 1:
        batch = _LETTERS[: right - 2]
        return "k", batch + "kn", batch + "n"
    if right == 1:
        batch = _LETTERS[: left - 2]
        return batch + "mk", "k", batch + "m"
    batch = _LETTERS[: max(left, right) - 2]
    return batch[len(batch) - (left - 2) :] + "mk", batch[len(batch) - (right - 2) :] + "kn", batch + "mn"


def _einsum_subscripts(equation: str, dims: tuple[int, ...]) -> tuple[list[str], str] | None:
    """Each operand's subscripts and the output's, ellipses spelled out; None for a repeated index (a diagonal)."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    operands = inputs.split(",")
    if len(operands) != len(dims):
        return None
    width = max((dim - len(sub) + 3 for sub, dim in zip(operands, dims, strict=True) if "..." in sub), default=0)
    ellipsis = "".join([letter for letter in _LETTERS if letter not in equation][:width])

    def spelled(sub: str, dim: int) -> str:  # an ellipsis stands for the operand's dimensions it covers, from the right
        head, dots, tail = sub.partition("...")
        return head + ellipsis[width - (dim - len(head) - len(tail)) :] + tail if dots else sub

    subs = [spelled(sub, dim) for sub, dim in zip(operands, dims, strict=True)]
    if not arrow:  # implicit output: the ellipsis, then the indices that appear once, in alphabetical order
        letters = inputs.replace("...", "").replace(",", "")
        once = sorted(letter for letter in set(letters) if letters.count(letter) == 1)
        output = ("..." if "..." in inputs else "") + "".join(once)
    output = output.replace("...", ellipsis)
    if any(len(set(sub)) != len(sub) for sub in [*subs, output]):
        return None
    return subs, output


@dataclass
class Contraction:
    """A product of an activation ``x`` and a parameter as an einsum: ``x_sub, p_sub -> out_sub``."""

    x_sub: str
    p_sub: str
    out_sub: str

    def example_dims(self, x: Tensor, parameter: Tensor, output: Tensor, count: int) -> list[int]:
        """The output's dimensions that index x (and not the parameter) with ``count`` entries."""
        p_size = dict(zip(self.p_sub, parameter.shape, strict=True))
        return [
            dim
            for dim, letter in enumerate(self.out_sub)
            if output.shape[dim] == count
            and letter in self.x_sub
            and x.shape[self.x_sub.index(letter)] == count
            and p_size.get(letter, 1) == 1
        ]

    def factors(self, x: Tensor, parameter: Tensor, grad: Tensor, dim: int) -> Factors:
        """The parameter's per-example gradients from ``x`` and the output's gradient ``grad``, examples at ``dim``.

        The parameter's indices split into those it shares with x alone (D, summed in the product), with the output
        alone (Q), and with both (a batch of blocks, as heads). Without the last, g_i = sum_t x_it[D] grad_it[Q]^T
        over the indices t that x and the output share: positions, as for a linear layer. With them, the per-example
        gradients are formed directly.
        """
        sizes: dict[str, int] = {}
        for sub, shape in ((self.x_sub, x.shape), (self.out_sub, grad.shape), (self.p_sub, parameter.shape)):
            for letter, size in zip(sub, shape, strict=True):
                sizes[letter] = max(sizes.get(letter, 1), size)
        # Indices over which the parameter is broadcast are positions too (it has size 1 there).
        p_sub = "".join(
            letter for letter, size in zip(self.p_sub, parameter.shape, strict=True) if size == sizes[letter]
        )
        example = self.out_sub[dim]
        if example in p_sub or example not in self.x_sub or any(c not in self.x_sub + self.out_sub for c in p_sub):
            raise ValueError("the examples' index is not one of the activation's alone")
        x = x.expand(
            [
                sizes[letter] if letter in self.out_sub else size
                for letter, size in zip(self.x_sub, x.shape, strict=True)
            ]
        )
        n = sizes[example]
        positions = "".join(c for c in self.x_sub if c in self.out_sub and c not in p_sub and c != example)
        summed = [c for c in p_sub if c in self.x_sub and c not in self.out_sub]
        kept = [c for c in p_sub if c in self.out_sub and c not in self.x_sub]
        if len(summed) + len(kept) < len(p_sub) or p_sub not in ("".join(summed + kept), "".join(kept + summed)):
            rows = torch.einsum(f"{self.x_sub},{self.out_sub}->{example}{p_sub}", x, grad)
            return Rows(rows.reshape(n, -1))
        length = math.prod(sizes[c] for c in positions)
        a = torch.einsum(f"{self.x_sub}->{example}{positions}{''.join(summed)}", x).reshape(n, length, -1)
        g = torch.einsum(f"{self.out_sub}->{example}{positions}{''.join(kept)}", grad).reshape(n, length, -1)
        # Positions(a, b) is sum_t b_t a_t^T: the parameter's first indices are the backprops'.
        return Positions(g, a) if p_sub.startswith("".join(summed)) and summed else Positions(a, g)


class _ContractionRule(OpRule):
    """A product with a parameter (``matmul``, ``mm``, ``bmm``, ``addmm``, ``einsum``, ``@``): the parameter on
    either side, transposed or not (``x @ W.T``), batched over heads or not; any other operand carries the examples.
    """

    roles: tuple[str, ...] = ("input", "other")

    def contraction(self, bound: dict[str, Any], role: str) -> Contraction:
        """The product as an einsum with the parameter at ``role`` and the activation at the other operand."""
        left, right = bound["input"], bound["other"]
        subs = _matmul_subscripts(left.dim(), right.dim())
        return Contraction(subs[1], subs[0], subs[2]) if role == "input" else Contraction(subs[0], subs[1], subs[2])

    def _split(self, roles: frozenset[str]) -> tuple[str, str] | None:
        """(the parameter's role, the activation's role), for a product with one parameter operand."""
        held = [role for role in ("input", "other") if role in roles]
        if len(held) != 1:
            return None
        return held[0], "other" if held[0] == "input" else "input"

    def example_dims(self, bound, output, count, roles):
        split = self._split(roles)
        if split is None:
            return []
        return self.contraction(bound, split[0]).example_dims(bound[split[1]], bound[split[0]], output, count)

    def flattened(self, bound, output, roles):
        split = self._split(roles)
        if split is None:
            return None
        x = bound[split[1]]
        if bound[split[0]].dim() == 1 or x.dim() == 1:
            return None
        # With the parameter on the right, x's rows (dim -2) are positions as much as its batch dimensions are.
        dims = range(x.dim() - 1) if split[0] == "other" else range(x.dim() - 2)
        return split[1], [dim for dim in dims if dim - x.dim() >= -output.dim()]

    def factors(self, bound, output, backprop, dim, roles):
        role, activation = self._split(roles)
        contraction = self.contraction(bound, role)
        scale = bound.get("alpha", 1)
        out = {role: contraction.factors(bound[activation].detach(), bound[role], backprop * scale, dim)}
        bias = bound.get("bias")
        if "bias" in roles and isinstance(bias, Tensor):
            out["bias"] = reduced_rows(backprop * bound.get("beta", 1), bias, dim)
        return out


@register_op_rule(torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm)
class MatmulRule(_ContractionRule):
    def bind(self, args, kwargs):
        bound = _bind(("input", "other"), {}, args, kwargs)
        if "mat2" in bound:
            bound["other"] = bound.pop("mat2")
        ok = all(isinstance(bound.get(k), Tensor) and bound[k].dim() > 0 for k in ("input", "other"))
        return bound if ok and "out" not in bound else None


@register_op_rule(Tensor.__rmatmul__)
class ReflectedMatmulRule(MatmulRule):
    def bind(self, args, kwargs):  # y.__rmatmul__(x) is x @ y
        return super().bind((args[1], args[0]), kwargs)


@register_op_rule(torch.addmm, Tensor.addmm)
class AddmmRule(_ContractionRule):
    """``beta * bias + alpha * (mat1 @ mat2)``: GPT-2's ``Conv1D``, ``addmm(bias, x.view(-1, nx), weight)``."""

    roles = ("input", "other", "bias")

    def bind(self, args, kwargs):
        bound = _bind(("bias", "input", "other"), {"beta": 1, "alpha": 1}, args, kwargs)
        for ours, theirs in (("bias", "input"), ("input", "mat1"), ("other", "mat2")):
            if theirs in kwargs:
                bound[ours] = kwargs[theirs]
        ok = all(isinstance(bound.get(k), Tensor) for k in ("input", "other")) and "out" not in kwargs
        return {k: bound[k] for k in ("bias", "input", "other", "beta", "alpha")} if ok else None

    def _split(self, roles):
        return super()._split(roles - {"bias"})


@register_op_rule(torch.einsum)
class EinsumRule(_ContractionRule):
    """``torch.einsum`` of two operands, one of them a parameter (per-head projections, bilinear forms)."""

    uncovered = "more than two operands, or an equation its rule cannot read"

    def bind(self, args, kwargs):
        if not args or not isinstance(args[0], str):
            return None
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], list | tuple):
            operands = tuple(operands[0])
        if len(operands) != 2 or not all(isinstance(t, Tensor) for t in operands):
            return None
        spelled = _einsum_subscripts(args[0], tuple(t.dim() for t in operands))
        if spelled is None:
            return None
        return {"input": operands[0], "other": operands[1], "subscripts": spelled}

    def contraction(self, bound, role):
        (left, right), out = bound["subscripts"]
        return Contraction(right, left, out) if role == "input" else Contraction(left, right, out)

    def flattened(self, bound, output, roles):
        return None  # the equation fixes the number of dimensions


#: Bytes of output cotangents one batched vector-Jacobian product of :class:`OperationVjp` may take.
VJP_BYTES = 64 * 1024**2


def batched_vjp(
    output: Tensor, variables: list[Tensor], cotangents: Callable[[int, int], Tensor], count: int
) -> list[Tensor | None]:
    """Vector-Jacobian products [count, *v.shape] of ``output`` with respect to each of ``variables``, for the
    cotangents ``cotangents(start, stop)`` [stop - start, *output.shape], in blocks of :data:`VJP_BYTES`.

    Each block goes through one batched backward (``is_grads_batched``), or one backward per cotangent where the
    graph's backward cannot be batched. The graph is kept (a tensor may be differentiated again). None for a
    variable ``output`` does not use.
    """
    block = max(1, VJP_BYTES // max(1, output.numel() * output.element_size()))
    parts: list[tuple[Tensor | None, ...]] = []
    for start in range(0, count, block):
        stop = min(count, start + block)
        batch = cotangents(start, stop).to(output.dtype)
        grads: tuple[Tensor | None, ...]
        try:
            grads = torch.autograd.grad(
                output, variables, batch, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:  # no batching rule for a backward in the graph: one backward per cotangent
            each = [torch.autograd.grad(output, variables, c, retain_graph=True, allow_unused=True) for c in batch]
            grads = tuple(
                None if g[0] is None else torch.stack(cast(list[Tensor], list(g))) for g in zip(*each, strict=True)
            )
        parts.append(grads)
    return [None if ps[0] is None else torch.cat(cast(list[Tensor], list(ps))) for ps in zip(*parts, strict=True)]


def masked_vjp(output: Tensor, variables: list[Tensor], backprop: Tensor, dim: int) -> list[Tensor | None]:
    """Per-example gradients [N, *v.shape] of each of ``variables`` through ``output``: the vector-Jacobian product
    of each example's slice of ``backprop`` (the output's gradient, examples along ``dim``), zero elsewhere."""
    n = backprop.shape[dim]
    shape = [1] * (backprop.dim() + 1)
    shape[dim + 1] = n

    def cotangents(start: int, stop: int) -> Tensor:
        onehot = torch.zeros(stop - start, n, dtype=backprop.dtype, device=backprop.device)
        onehot[torch.arange(stop - start), torch.arange(start, stop)] = 1
        return backprop.unsqueeze(0) * onehot.reshape(stop - start, *shape[1:])

    return batched_vjp(output, variables, cotangents, n)


class OperationVjp(OpRule):
    """Any other operation with a parameter operand, its examples along a dimension of its output (or flattened in
    one with other positions): each example's
    gradient from a vector-Jacobian product of this one operation, with the output gradient of that example alone.

    The operation is recomputed from its recorded arguments (the others detached), so its cost is that of its own
    backward for each example, never the model's. Recurrent kernels (``torch.lstm``, ...) are not taken: they run a
    whole network over the sequence, and the exact whole-model fallback batches them better.
    """

    def bind(self, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        return {"leaves": leaves, "spec": spec}

    def example_dims(self, bound, output, count, roles):
        return [dim for dim in range(output.dim()) if output.shape[dim] == count]

    def flattened(self, bound, output, roles):
        # Any dimension of the output may flatten the examples with other positions (``index_select`` of a table by
        # ids flattened to [N * T], a result reshaped to [N * T, d]); which order, if any, autograd confirms.
        return "result", list(range(output.dim()))

    def factors(self, bound, output, backprop, dim, roles):
        func = bound["func"]
        leaves = [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in bound["leaves"]]
        if bound["inplace"]:
            leaves[0] = leaves[0].clone()
        variables = {}
        for role in roles:
            index = int(role.removeprefix("operand"))
            variables[role] = leaves[index] = bound["leaves"][index].detach().requires_grad_(True)
        args, kwargs = tree_unflatten(leaves, bound["spec"])
        with torch.enable_grad():
            recomputed = func(*args, **kwargs)
            if recomputed.shape != backprop.shape:  # the examples unflattened from one of its dimensions
                recomputed = recomputed.reshape(backprop.shape)
        grads = masked_vjp(recomputed, list(variables.values()), backprop, dim)
        return {
            role: Rows(grad.reshape(grad.shape[0], -1))
            for role, grad in zip(variables, grads, strict=True)
            if grad is not None
        }


#: The rule of operations no other rule covers.
OPERATION_VJP = OperationVjp()


def fold_items(factors: Factors, count: int, split: str) -> Factors:
    """The factors of ``count`` examples from those of their items, k each, along dim 0 ([count * k]): each
    example's gradient is the sum of its items' (its positions are its items' positions, one after another).

    Args:
        factors: a call's factors with its items as examples (:attr:`OpRule.items`).
        count: the number of examples.
        split: ``"outer"`` (each example's k items consecutive, as ``x.flatten(0, 1)`` of [N, T, ...] lays them)
            or ``"inner"`` (the examples vary fastest: [T, N, ...] flattened).

    Raises:
        ValueError: for factors that do not sum over items (an embedding's tokens).
    """

    def grouped(t: Tensor) -> Tensor:  # [count * k, ...] -> [count, k, ...]
        return t.unflatten(0, (count, -1)) if split == "outer" else t.unflatten(0, (-1, count)).transpose(0, 1)

    if isinstance(factors, Rows):
        return Rows(grouped(factors.rows).sum(1))
    if not isinstance(factors, Positions):
        raise ValueError(f"{type(factors).__name__} factors do not fold items into examples")
    backprops = grouped(factors.backprops).flatten(1, 2)  # [count, k * L, p]: item-major positions
    activations = factors.activations
    if isinstance(activations, Tensor):
        return Positions(grouped(activations).flatten(1, 2), backprops)
    return Positions(_folded_lazy(activations, grouped(activations.source)), backprops)


def _folded_lazy(items: LazyPositions, source: Tensor) -> LazyPositions:
    """Lazily formed positions of examples whose items [B, k, ...] are ``items``' examples."""
    expand, gradients = items.expand, items.gradients

    def folded_expand(s: Tensor) -> Tensor:  # [B, k, ...] -> [B, k * L, d]
        return expand(s.flatten(0, 1)).unflatten(0, (s.shape[0], -1)).flatten(1, 2)

    if gradients is None:
        return LazyPositions(source, folded_expand)

    def folded_gradients(s: Tensor, b: Tensor) -> Tensor:  # b [B, k * L, p] -> [B, numel]
        per_item = gradients(s.flatten(0, 1), b.unflatten(1, (s.shape[1], -1)).flatten(0, 1))
        return per_item.unflatten(0, (s.shape[0], -1)).sum(1)

    return LazyPositions(source, folded_expand, folded_gradients)


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


def transposed_factors(factors: Factors, shape: torch.Size) -> Factors:
    """The factors of a matrix's gradient from those of its transpose's (``shape``: the transpose's)."""
    if isinstance(factors, Positions):  # sum_t b a^T transposed is sum_t a b^T
        activations = factors.activations
        if isinstance(activations, LazyPositions):
            activations = activations.full()
        return Positions(factors.backprops, activations)
    rows = rows_per_example(factors)
    return Rows(rows.reshape(rows.shape[0], *shape).transpose(1, 2).reshape(rows.shape[0], -1))


def factors_numel(factors: Factors) -> int:
    """The number of parameter entries a use's per-example gradient has."""
    if isinstance(factors, Rows):
        return factors.rows.shape[1]
    if isinstance(factors, Positions):
        return factors.activations.shape[2] * factors.backprops.shape[2]
    return factors.num_embeddings * factors.backprops.shape[-1]


__all__ = [
    "OPERATION_VJP",
    "OP_RULES",
    "Factors",
    "OpRule",
    "Positions",
    "Rows",
    "Tokens",
    "batched_vjp",
    "factors_numel",
    "fold_items",
    "register_op_rule",
    "rows_per_example",
    "transposed_factors",
]
