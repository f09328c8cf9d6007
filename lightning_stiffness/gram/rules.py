"""Module rules of the factored Gram engine: for layer types whose forward no operation rule (:mod:`.ops`) covers.

The built-in rules work at the level of operations (``F.linear``, ``F.conv2d``, ``F.embedding``, ...), whichever
module calls them. A module rule covers a user's own layer type as a whole: it receives the layer, its input
activations and the gradients of the summed loss with respect to its output (for a chunk of examples, along dim 0),
the names of the layer's own parameters to cover, and the size of the whole Gram matrix to be computed. It returns
one factored term per parameter (see :mod:`.terms`); the engine joins the chunks' terms::

    @register_gram_rule(MyLayer, supports=lambda layer: layer.some_option is None)
    def my_layer_rule(layer, activations, backprops, params, n, m):
        return {"weight": OuterTerm(activations, backprops)}

Rules match a module's exact type: a subclass may change ``forward`` and must be registered on its own. Every term
is checked per example before it is used (:mod:`.check`): a wrong rule costs speed, never exactness.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_stiffness.gram.terms import Term

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
