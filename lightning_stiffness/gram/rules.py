"""Per-layer rules of the factored Gram engine: one small function per layer type, registered with a decorator.

A rule receives the layer, its input activations and the gradients of the summed loss with respect to its output
(for a chunk of examples), the names of the layer's own parameters to cover, and the size of the whole Gram matrix
to be computed. It returns one factored term per parameter (see :mod:`.terms`); the engine joins the chunks' terms.
To support a new layer type::

    @register_gram_rule(MyLayer, supports=lambda layer: layer.some_option is None)
    def my_layer_rule(layer, activations, backprops, params, n, m):
        return {"weight": OuterTerm(activations, backprops)}

Rules match a module's exact type: a subclass may change ``forward`` and must be registered on its own. Whatever a
rule does not cover is computed by the torch.func engine, so an unsupported layer costs speed, never exactness.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_stiffness.gram.terms import (
    BlockedTerm,
    FlatTerm,
    GhostTerm,
    LazyPositions,
    OuterTerm,
    PerExampleTerm,
    sequence_term,
)

Term = OuterTerm | FlatTerm | PerExampleTerm | GhostTerm | BlockedTerm
RuleFn = Callable[[nn.Module, Tensor, Tensor, set[str], int, int], dict[str, Term]]


@dataclass(frozen=True)
class GramRule:
    """A registered rule: the function, the parameters it can cover, and which layer settings it supports."""

    fn: RuleFn
    params: tuple[str, ...]
    supports: Callable[[nn.Module], bool]


#: Exact module type -> its rule.
GRAM_RULES: dict[type[nn.Module], GramRule] = {}


def register_gram_rule(
    *layer_types: type[nn.Module],
    params: tuple[str, ...] = ("weight", "bias"),
    supports: Callable[[nn.Module], bool] = lambda layer: True,
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the factored Gram rule of ``layer_types`` (exact types), covering ``params``."""

    def decorator(fn: RuleFn) -> RuleFn:
        for layer_type in layer_types:
            GRAM_RULES[layer_type] = GramRule(fn=fn, params=params, supports=supports)
        return fn

    return decorator


def rule_for(module: nn.Module) -> GramRule | None:
    """The rule for ``module`` when one is registered for its exact type and supports its settings."""
    rule = GRAM_RULES.get(type(module))
    return rule if rule is not None and rule.supports(module) else None


@register_gram_rule(nn.Linear)
def linear_rule(layer: nn.Linear, activations: Tensor, backprops: Tensor, params: set[str], n: int, m: int):
    terms: dict[str, Term] = {}
    if activations.dim() == 2:
        if "weight" in params:
            terms["weight"] = OuterTerm(activations, backprops)
        if "bias" in params:
            terms["bias"] = FlatTerm(backprops)
        return terms
    # Applied at every position of a sequence (or any extra dimensions): T positions per example.
    acts = activations.reshape(activations.shape[0], -1, activations.shape[-1])
    grads = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
    if "weight" in params:
        terms["weight"] = sequence_term(acts, grads, n, m)
    if "bias" in params:
        terms["bias"] = FlatTerm(grads.sum(dim=1))
    return terms


def _plain_convolution(conv: nn.Module) -> bool:
    # Groups, non-zero padding modes and string paddings ("same") change how patches map to weights: fall back.
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


@register_gram_rule(nn.Conv1d, nn.Conv2d, supports=_plain_convolution)
def convolution_rule(layer: nn.Module, activations: Tensor, backprops: Tensor, params: set[str], n: int, m: int):
    if isinstance(layer, nn.Conv1d):
        source = activations.unsqueeze(2)
        kernel, dilation = (1, layer.kernel_size[0]), (1, layer.dilation[0])
        padding, stride = (0, layer.padding[0]), (1, layer.stride[0])
    else:
        source = activations
        kernel, dilation, padding, stride = layer.kernel_size, layer.dilation, layer.padding, layer.stride

    def patches(x: Tensor) -> Tensor:  # [n, T, C_in * prod(kernel)], in the order of the flattened weight
        return F.unfold(x, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)

    acts = LazyPositions(source, patches)
    grads = backprops.reshape(backprops.shape[0], backprops.shape[1], -1).transpose(1, 2)  # [N, T, C_out]
    terms: dict[str, Term] = {}
    if "weight" in params:
        terms["weight"] = sequence_term(acts, grads, n, m)
    if "bias" in params:
        terms["bias"] = FlatTerm(grads.sum(dim=1))
    return terms


def _affine_terms(normalised: Tensor, backprops: Tensor, sum_dims: tuple[int, ...], params: set[str]):
    terms: dict[str, Term] = {}
    if "weight" in params:
        weight = (backprops * normalised).sum(dim=sum_dims) if sum_dims else backprops * normalised
        terms["weight"] = FlatTerm(weight.reshape(weight.shape[0], -1))
    if "bias" in params:
        bias = backprops.sum(dim=sum_dims) if sum_dims else backprops
        terms["bias"] = FlatTerm(bias.reshape(bias.shape[0], -1))
    return terms


@register_gram_rule(nn.LayerNorm, supports=lambda norm: norm.elementwise_affine)
def layer_norm_rule(layer: nn.LayerNorm, activations: Tensor, backprops: Tensor, params: set[str], n: int, m: int):
    normalised = F.layer_norm(activations, layer.normalized_shape, eps=layer.eps)
    sum_dims = tuple(range(1, activations.dim() - len(layer.normalized_shape)))
    return _affine_terms(normalised, backprops, sum_dims, params)


@register_gram_rule(nn.GroupNorm, supports=lambda norm: norm.affine)
def group_norm_rule(layer: nn.GroupNorm, activations: Tensor, backprops: Tensor, params: set[str], n: int, m: int):
    normalised = F.group_norm(activations, layer.num_groups, eps=layer.eps)
    return _affine_terms(normalised, backprops, tuple(range(2, activations.dim())), params)


def _eval_batch_norm(norm: nn.Module) -> bool:
    # In eval mode with running statistics the normalisation is a fixed per-channel affine map.
    return norm.affine and not norm.training and norm.running_mean is not None


@register_gram_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, supports=_eval_batch_norm)
def batch_norm_rule(layer: nn.Module, activations: Tensor, backprops: Tensor, params: set[str], n: int, m: int):
    shape = (1, -1) + (1,) * (activations.dim() - 2)
    normalised = (activations - layer.running_mean.reshape(shape)) * torch.rsqrt(
        layer.running_var.reshape(shape) + layer.eps
    )
    return _affine_terms(normalised, backprops, tuple(range(2, activations.dim())), params)
