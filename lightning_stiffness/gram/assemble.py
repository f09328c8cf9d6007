"""A parameter's uses, as factors, become one term per chunk of examples (see :mod:`.ops` and :mod:`.terms`).

Uses of one kind join without materialising per-example gradients: a weight applied at several call sites (a block
applied twice, tied weights) is a weight applied at more positions, so its positions are concatenated and the
cheapest form is chosen for them all; rows add; an embedding's token uses concatenate. Uses of different kinds (an
embedding table tied to an output layer) are materialised as per-example gradients and added, where they fit.
"""

import torch
from torch import Tensor

from lightning_stiffness.gram.ops import Factors, Positions, Rows, Tokens, factors_numel, rows_per_example
from lightning_stiffness.gram.terms import (
    PER_EXAMPLE_BYTES,
    FlatTerm,
    LazyPositions,
    OuterTerm,
    PerExampleTerm,
    Term,
    TokenTerm,
    sequence_term,
)


def term_of(uses: list[Factors | Term], n: int, m: int) -> Term | None:
    """One term for all ``uses`` of a parameter (or of one slice of it) in a chunk; None when they cannot join.

    Args:
        uses: each use's factors (or, from a module rule, its term), examples along dim 0.
        n: rows of the whole Gram matrix to be computed; m: its columns (for choosing forms by cost).
    """
    if len(uses) == 1 and not isinstance(uses[0], Positions | Rows | Tokens):
        return uses[0]
    if all(isinstance(use, Positions) for use in uses):
        return _positions_term(uses, n, m)
    if all(isinstance(use, Rows) for use in uses):
        return FlatTerm(torch.stack([use.rows for use in uses]).sum(dim=0) if len(uses) > 1 else uses[0].rows)
    if all(isinstance(use, Tokens) for use in uses):
        ids = torch.cat([use.ids for use in uses], dim=1)
        return TokenTerm(ids, torch.cat([use.backprops for use in uses], dim=1), uses[0].num_embeddings)
    return _materialised(uses, n, m)


def _positions_term(uses: list[Positions], n: int, m: int) -> Term | None:
    if len(uses) == 1:
        a, b = uses[0].activations, uses[0].backprops
        if isinstance(a, Tensor) and a.shape[1] == 1:  # one vector per example: the outer form
            return OuterTerm(a[:, 0], b[:, 0])
        return sequence_term(a, b, n, m)
    if any(isinstance(use.activations, LazyPositions) for use in uses):
        return _materialised(uses, n, m)
    activations = torch.cat([use.activations for use in uses], dim=1)
    return sequence_term(activations, torch.cat([use.backprops for use in uses], dim=1), n, m)


def _materialised(uses: list[Factors | Term], n: int, m: int) -> Term | None:
    """Per-example gradients of every use, added; None when they would take more than the per-example budget."""
    first = uses[0]
    numel = first.per_example().shape[1] if hasattr(first, "per_example") else factors_numel(first)
    element = 8 if any(_dtype(use) == torch.float64 for use in uses) else 4
    if (n + m) * numel * element > PER_EXAMPLE_BYTES:
        return None
    total = None
    for use in uses:
        rows = use.per_example() if hasattr(use, "per_example") else rows_per_example(use)
        total = rows if total is None else total + rows
    return PerExampleTerm(total)


def _dtype(use: Factors | Term) -> torch.dtype | None:
    for name in ("rows", "backprops"):
        value = getattr(use, name, None)
        if isinstance(value, Tensor):
            return value.dtype
    return None
