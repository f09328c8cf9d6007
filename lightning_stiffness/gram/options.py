"""The keywords of :func:`~lightning_stiffness.gram.gradient_gram` as one object, :class:`GramOptions`.

``gradient_gram`` keeps its flat keywords for users; inside the package the same settings travel as one frozen
:class:`GramOptions` (the engines, the whole-dataset measure, the callback's probe), so each is declared once. A
caller that changes one setting for one call makes a copy with :func:`dataclasses.replace`.

Example::

    >>> from dataclasses import replace
    >>> options = GramOptions(method="loop", chunk_size=8)
    >>> replace(options, per_layer=True)
    GramOptions(loss_fn=None, forward_fn=None, params=None, method='loop', chunk_size=8, per_layer=True, progress=None, gather_columns=None)
"""  # noqa: E501

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from lightning_stiffness.gram.inputs import ForwardFn
from lightning_stiffness.gram.rules import Term

LossFn = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GramOptions:
    """How :func:`~lightning_stiffness.gram.gradient_gram` computes (its keywords; see there for each one).

    Attributes:
        loss_fn: ``loss_fn(outputs, targets) -> [N]`` per-example losses; None: cross-entropy.
        forward_fn: ``forward_fn(model, x) -> outputs``; None: ``model(x)``, ``model(*x)`` or ``model(**x)``.
        params: names of the parameters to differentiate; None: every trainable parameter.
        method: the engine, one of :data:`~lightning_stiffness.gram.METHODS`.
        chunk_size: examples per block; None: the engine's default.
        per_layer: one Gram matrix per layer instead of their sum.
        progress: called as ``progress(done, total)``.
        gather_columns: for distributed use, a factored term of this process's rows -> the same term over all
            examples.
    """

    loss_fn: LossFn | None = None
    forward_fn: ForwardFn | None = None
    params: Sequence[str] | None = None
    method: str = "auto"
    chunk_size: int | None = None
    per_layer: bool = False
    progress: Progress | None = None
    gather_columns: Callable[[Term], Term] | None = None
