"""Factored forms of one layer's per-example gradients, and the Gram matrix between two of them.

A layer's gradient for example i is built from its input activations a_i and the gradient b_i of the loss with
respect to its output. Each form keeps what it needs of those factors and computes <g_i, g'_j>:

- :class:`OuterTerm`, a weight applied to one vector per example: g_i = b_i a_i^T, so
  <g_i, g'_j> = (a_i . a'_j)(b_i . b'_j): N M (d + p) operations, (N + M)(d + p) numbers kept.
- :class:`FlatTerm`, per-example gradients held as rows (biases, norm affines): a plain matmul.
- :class:`PerExampleTerm`, a weight applied at T positions (sequences, convolution patches) whose per-example
  gradients g_i = sum_t b_it a_it^T are formed chunk by chunk as the examples pass and kept: (N + M) T d p + N M d p
  operations, (N + M) d p numbers kept (often far fewer than the factors, T (d + p) per example).
- :class:`GhostTerm`, the same layer in the ghost form <g_i, g'_j> = sum_{t,s} (a_it . a'_js)(b_it . b'_js):
  N M T^2 (d + p) operations, cheaper for short sequences of wide layers.
- :class:`BlockedTerm`, the same layer when even its per-example gradients are too large to keep: factors kept,
  per-example gradients formed a block at a time (recomputed for each block of the Gram matrix).

Terms computed for chunks of examples are joined with ``concat``. Every ``gram`` works in blocks sized from a
memory budget, so one layer's working set stays bounded.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: Bytes one layer's working set may take while its Gram block is computed.
WORKING_SET_BYTES = 512 * 1024**2
#: Bytes of per-example gradients one layer may keep (both sets together) in the per-example form.
PER_EXAMPLE_BYTES = 512 * 1024**2


def _rows_per_block(bytes_per_row: int) -> int:
    return max(1, WORKING_SET_BYTES // max(1, bytes_per_row))


class LazyPositions:
    """Per-position activations [N, T, d] formed a slice of examples at a time (convolution patches).

    Unfolding a whole probe set at once multiplies the input's memory by the kernel size; the forms that need
    activations only ever take one block of examples.
    """

    def __init__(self, source: Tensor, expand: Callable[[Tensor], Tensor]) -> None:
        self.source = source
        self.expand = expand
        one = expand(source[:1])
        self.shape = (source.shape[0], one.shape[1], one.shape[2])
        self.dtype, self.device = one.dtype, one.device

    def __getitem__(self, index: slice) -> Tensor:
        return self.expand(self.source[index])

    def element_size(self) -> int:
        return self.source.element_size()

    def full(self) -> Tensor:
        return self.expand(self.source)


def per_example_gradients(activations: Tensor | LazyPositions, backprops: Tensor, start: int, stop: int) -> Tensor:
    """sum_t b_it a_it^T for examples [start, stop), flattened like the weight: [stop - start, p * d]."""
    grads = torch.bmm(backprops[start:stop].transpose(1, 2), activations[start:stop])
    return grads.reshape(stop - start, -1)


@dataclass
class OuterTerm:
    """g_i = b_i a_i^T: activations a [N, d] and output gradients b [N, p]."""

    activations: Tensor
    backprops: Tensor
    form = "outer"

    def gram(self, other: "OuterTerm") -> Tensor:
        return (self.activations @ other.activations.T) * (self.backprops @ other.backprops.T)

    @property
    def num_examples(self) -> int:
        return self.activations.shape[0]

    def per_example(self) -> Tensor:
        """Per-example gradients [N, p * d], flattened like the parameter (for the per-example check)."""
        return torch.einsum("np,nd->npd", self.backprops, self.activations).reshape(self.backprops.shape[0], -1)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "OuterTerm":
        """The same term with ``fn`` applied to each tensor indexed by example (for gathering across processes)."""
        return type(self)(fn(self.activations), fn(self.backprops))

    @classmethod
    def concat(cls, terms: list["OuterTerm"]) -> "OuterTerm":
        return cls(torch.cat([t.activations for t in terms]), torch.cat([t.backprops for t in terms]))


@dataclass
class FlatTerm:
    """Per-example gradients held as rows [N, k]."""

    rows: Tensor
    form = "flat"

    def gram(self, other: "FlatTerm") -> Tensor:
        return self.rows @ other.rows.T

    @property
    def num_examples(self) -> int:
        return self.rows.shape[0]

    def per_example(self) -> Tensor:
        return self.rows

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "FlatTerm":
        return type(self)(fn(self.rows))

    @classmethod
    def concat(cls, terms: list["FlatTerm"]) -> "FlatTerm":
        return cls(torch.cat([t.rows for t in terms]))


class PerExampleTerm(FlatTerm):
    """A weight applied at T positions, its per-example gradients formed once and kept as rows."""

    form = "materialised"


@dataclass
class _PositionsTerm:
    """A weight applied at T positions: activations [N, T, d], output gradients [N, T, p]."""

    activations: Tensor | LazyPositions
    backprops: Tensor

    @property
    def num_examples(self) -> int:
        return self.activations.shape[0]

    def per_example(self) -> Tensor:
        return per_example_gradients(self.activations, self.backprops, 0, self.num_examples)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "_PositionsTerm":
        if isinstance(self.activations, LazyPositions):
            return type(self)(LazyPositions(fn(self.activations.source), self.activations.expand), fn(self.backprops))
        return type(self)(fn(self.activations), fn(self.backprops))

    @classmethod
    def concat(cls, terms: list["_PositionsTerm"]) -> "_PositionsTerm":
        first = terms[0].activations
        if isinstance(first, LazyPositions):
            activations = LazyPositions(torch.cat([t.activations.source for t in terms]), first.expand)
        else:
            activations = torch.cat([t.activations for t in terms])
        return cls(activations, torch.cat([t.backprops for t in terms]))


class GhostTerm(_PositionsTerm):
    """g_i = sum_t b_it a_it^T, computed in the ghost form."""

    form = "ghost"

    def gram(self, other: "GhostTerm") -> Tensor:
        n, t, d = self.activations.shape
        m, s, _ = other.activations.shape
        a_cols = other.activations.reshape(m * s, d)
        b_cols = other.backprops.reshape(m * s, -1)
        out = torch.empty(n, m, dtype=self.activations.dtype, device=self.activations.device)
        block = _rows_per_block(2 * t * m * s * self.activations.element_size())
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            a_rows = self.activations[r0:r1].reshape(-1, d)
            b_rows = self.backprops[r0:r1].reshape((r1 - r0) * t, -1)
            products = (a_rows @ a_cols.T) * (b_rows @ b_cols.T)
            out[r0:r1] = products.reshape(r1 - r0, t, m, s).sum(dim=(1, 3))
        return out


class BlockedTerm(_PositionsTerm):
    """g_i = sum_t b_it a_it^T, formed a block of examples at a time for each block of the Gram matrix."""

    form = "materialised-blocked"

    def gram(self, other: "BlockedTerm") -> Tensor:
        n, m = self.activations.shape[0], other.activations.shape[0]
        size = self.activations.shape[2] * self.backprops.shape[2]
        block = _rows_per_block(2 * size * self.backprops.element_size())
        out = torch.empty(n, m, dtype=self.backprops.dtype, device=self.backprops.device)
        same = other is self
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            rows = per_example_gradients(self.activations, self.backprops, r0, r1)
            for c0 in range(r0 if same else 0, m, block):
                c1 = min(m, c0 + block)
                cols = rows if same and c0 == r0 else per_example_gradients(other.activations, other.backprops, c0, c1)
                out[r0:r1, c0:c1] = rows @ cols.T
                if same and c0 != r0:
                    out[c0:c1, r0:r1] = out[r0:r1, c0:c1].T
        return out


def sequence_term(
    activations: Tensor | LazyPositions, backprops: Tensor, n: int, m: int
) -> PerExampleTerm | GhostTerm | BlockedTerm:
    """The cheapest form for a weight applied at T positions, for a chunk of examples.

    Args:
        activations: [B, T, d] inputs at each position (B examples of this chunk).
        backprops: [B, T, p] output gradients at each position.
        n: rows of the whole Gram matrix to be computed.
        m: columns of the whole Gram matrix (equal to ``n`` for a square one).
    """
    t, d, p = activations.shape[1], activations.shape[2], backprops.shape[2]
    ghost_ops = n * m * t * t * (d + p)
    materialised_ops = (n + m) * t * d * p + n * m * d * p
    if ghost_ops < materialised_ops:
        full = activations.full() if isinstance(activations, LazyPositions) else activations
        return GhostTerm(full, backprops)
    if (n + m) * d * p * backprops.element_size() <= PER_EXAMPLE_BYTES:
        return PerExampleTerm(per_example_gradients(activations, backprops, 0, activations.shape[0]))
    return BlockedTerm(activations, backprops)
