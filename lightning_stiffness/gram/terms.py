"""Factored forms of one layer's per-example gradients, and the Gram matrix between two of them.

A layer's gradient for example i is built from its input activations a_i and the gradient b_i of the loss with
respect to its output. Each form below keeps those factors and computes <g_i, g'_j> without forming the
per-example gradients, or forms them a block at a time, whichever costs fewer operations:

- :class:`OuterTerm`, a weight applied to one vector per example: g_i = b_i a_i^T, so
  <g_i, g'_j> = (a_i . a'_j)(b_i . b'_j).
- :class:`FlatTerm`, small per-example gradients held as rows (biases, norm affines): a plain matmul.
- :class:`GhostTerm`, a weight applied at T positions (sequences, convolution patches):
  <g_i, g'_j> = sum_{t,s} (a_it . a'_js)(b_it . b'_js), N M T^2 (d + p) operations.
- :class:`MaterialisedTerm`, the same layer with g_i = sum_t b_it a_it^T formed a block of examples at a time:
  (N + M) T d p + N M d p operations.

Every ``gram`` works in blocks sized from a memory budget, so one layer's working set stays bounded.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: Bytes one layer's working set may take while its Gram block is computed.
WORKING_SET_BYTES = 512 * 1024**2


def _rows_per_block(bytes_per_row: int) -> int:
    return max(1, WORKING_SET_BYTES // max(1, bytes_per_row))


class LazyPositions:
    """Per-position activations [N, T, d] formed a slice of examples at a time (convolution patches).

    Unfolding a whole probe set at once multiplies the input's memory by the kernel size; a materialised term only
    ever needs one block of examples.
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


@dataclass
class OuterTerm:
    """g_i = b_i a_i^T: activations a [N, d] and output gradients b [N, p]."""

    activations: Tensor
    backprops: Tensor

    def gram(self, other: "OuterTerm") -> Tensor:
        return (self.activations @ other.activations.T) * (self.backprops @ other.backprops.T)

    def summed(self) -> Tensor:
        """The gradient summed over examples, flattened like the parameter."""
        return (self.backprops.T @ self.activations).flatten()


@dataclass
class FlatTerm:
    """Per-example gradients held as rows [N, k]."""

    rows: Tensor

    def gram(self, other: "FlatTerm") -> Tensor:
        return self.rows @ other.rows.T

    def summed(self) -> Tensor:
        return self.rows.sum(dim=0)


@dataclass
class _PositionsTerm:
    """A weight applied at T positions: activations [N, T, d], output gradients [N, T, p]."""

    activations: Tensor | LazyPositions
    backprops: Tensor

    def summed(self) -> Tensor:
        n = self.activations.shape[0]
        block = _rows_per_block(self.activations.shape[1] * self.activations.shape[2] * self.backprops.element_size())
        total = None
        for start in range(0, n, block):
            part = torch.einsum(
                "ntp,ntd->pd", self.backprops[start : start + block], self.activations[start : start + block]
            )
            total = part if total is None else total.add_(part)
        return total.flatten()


@dataclass
class GhostTerm(_PositionsTerm):
    """g_i = sum_t b_it a_it^T, computed in the ghost form."""

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


@dataclass
class MaterialisedTerm(_PositionsTerm):
    """g_i = sum_t b_it a_it^T, formed a block of examples at a time."""

    def _gradients(self, start: int, stop: int) -> Tensor:
        grads = torch.einsum("ntp,ntd->npd", self.backprops[start:stop], self.activations[start:stop])
        return grads.reshape(stop - start, -1)

    def gram(self, other: "MaterialisedTerm") -> Tensor:
        n, m = self.activations.shape[0], other.activations.shape[0]
        size = self.activations.shape[2] * self.backprops.shape[2]
        block = _rows_per_block(2 * size * self.activations.element_size())
        out = torch.empty(n, m, dtype=self.activations.dtype, device=self.activations.device)
        same = other is self
        cols_cache = other._gradients(0, m) if (not same and m <= block) else None
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            rows = self._gradients(r0, r1)
            for c0 in range(0, m, block):
                c1 = min(m, c0 + block)
                if cols_cache is not None:
                    cols = cols_cache[c0:c1]
                elif same and c0 == r0:
                    cols = rows
                else:
                    cols = other._gradients(c0, c1)
                out[r0:r1, c0:c1] = rows @ cols.T
        return out


def sequence_term(
    activations: Tensor | LazyPositions, backprops: Tensor, n: int, m: int
) -> tuple[GhostTerm | MaterialisedTerm, str]:
    """The cheaper of the ghost and materialised forms for a layer applied at T positions, and its name.

    Args:
        activations: [N, T, d] inputs at each position.
        backprops: [N, T, p] output gradients at each position.
        n: rows of the Gram matrix to be computed.
        m: columns of the Gram matrix to be computed.
    """
    t, d, p = activations.shape[1], activations.shape[2], backprops.shape[2]
    ghost_ops = n * m * t * t * (d + p)
    materialised_ops = (n + m) * t * d * p + n * m * d * p
    if ghost_ops < materialised_ops:
        full = activations.full() if isinstance(activations, LazyPositions) else activations
        return GhostTerm(full, backprops), "ghost"
    return MaterialisedTerm(activations, backprops), "materialised"
