"""A parameter's uses, as factors, become one term per chunk of examples (see :mod:`.ops` and :mod:`.terms`).

Uses of one kind join without materialising per-example gradients: a weight applied at several call sites (a block
applied twice, tied weights) is a weight applied at more positions, so its positions are concatenated and the
cheapest form is chosen for them all; rows add; an embedding's token uses concatenate. Uses of different kinds (an
embedding table tied to an output layer) are materialised as per-example gradients and added, where they fit.
"""

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from lightning_stiffness.gram.ops import Factors, Positions, Rows, Tokens, factors_numel, rows_per_example
from lightning_stiffness.gram.terms import (
    PER_EXAMPLE_BYTES,
    FlatTerm,
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
    positions = [use for use in uses if isinstance(use, Positions)]
    if len(positions) == len(uses):
        return _positions_term(positions, n, m)
    rows = [use.rows for use in uses if isinstance(use, Rows)]
    if len(rows) == len(uses):
        return FlatTerm(torch.stack(rows).sum(dim=0) if len(rows) > 1 else rows[0])
    tokens = [use for use in uses if isinstance(use, Tokens)]
    if len(tokens) == len(uses):
        ids = torch.cat([use.ids for use in tokens], dim=1)
        return TokenTerm(ids, torch.cat([use.backprops for use in tokens], dim=1), tokens[0].num_embeddings)
    return _materialised(uses, n, m)


def _positions_term(uses: list[Positions], n: int, m: int) -> Term | None:
    if len(uses) == 1:
        a, b = uses[0].activations, uses[0].backprops
        if isinstance(a, Tensor) and a.shape[1] == 1:  # one vector per example: the outer form
            return OuterTerm(a[:, 0], b[:, 0])
        return sequence_term(a, b, n, m)
    activations = [use.activations for use in uses if isinstance(use.activations, Tensor)]
    if len(activations) < len(uses):  # lazily formed patches: per-example gradients, use by use
        return _materialised(uses, n, m)
    joined = torch.cat(activations, dim=1)
    return sequence_term(joined, torch.cat([use.backprops for use in uses], dim=1), n, m)


def _materialised(uses: Sequence[Factors | Term], n: int, m: int) -> Term | None:
    """Per-example gradients of every use, added; None when they would take more than the per-example budget."""
    first = uses[0]
    numel = _rows(first).shape[1] if hasattr(first, "per_example") else factors_numel(cast(Factors, first))
    element = 8 if any(_dtype(use) == torch.float64 for use in uses) else 4
    if (n + m) * numel * element > PER_EXAMPLE_BYTES:
        return None
    each = [_rows(use) for use in uses]
    total = each[0]
    for rows in each[1:]:
        total = total + rows
    return PerExampleTerm(total)


def _rows(use: Factors | Term) -> Tensor:
    """A use's per-example gradients [N, numel]: a term's own (a module rule's too), or formed from factors."""
    if hasattr(use, "per_example"):
        return cast(Term, use).per_example()
    return rows_per_example(cast(Factors, use))


def _dtype(use: Factors | Term) -> torch.dtype | None:
    for name in ("rows", "backprops"):
        value = getattr(use, name, None)
        if isinstance(value, Tensor):
            return value.dtype
    return None
