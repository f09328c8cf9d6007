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
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

#: Bytes one layer's working set may take while its Gram block is computed.
WORKING_SET_BYTES = 256 * 1024**2
#: Bytes of per-example gradients one layer may keep (both sets together) in the per-example form.
PER_EXAMPLE_BYTES = 512 * 1024**2


def _rows_per_block(bytes_per_row: int) -> int:
    return max(1, WORKING_SET_BYTES // max(1, bytes_per_row))


class LazyPositions:
    """Per-position activations [N, T, d] formed a slice of examples at a time (convolution patches).

    Unfolding a whole probe set at once multiplies the input's memory by the kernel size; the forms that need
    activations only ever take one block of examples. ``gradients(source, backprops)``, where given, forms the
    per-example gradients [B, p * d] of a slice without the patches (a convolution's own backward, faster where
    there are many positions).
    """

    def __init__(
        self,
        source: Tensor,
        expand: Callable[[Tensor], Tensor],
        gradients: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.source = source
        self.expand = expand
        self.gradients = gradients
        one = expand(source[:1])
        self.shape = (source.shape[0], one.shape[1], one.shape[2])
        self.dtype, self.device = one.dtype, one.device

    def __getitem__(self, index: slice) -> Tensor:
        return self.expand(self.source[index])

    def like(self, source: Tensor) -> "LazyPositions":
        """The same expansion (and per-example gradients) of another ``source``: a slice, a join of chunks."""
        return LazyPositions(source, self.expand, self.gradients)

    def element_size(self) -> int:
        return self.source.element_size()

    def full(self) -> Tensor:
        return self.expand(self.source)


#: Rows per block of a symmetric product ``rows @ rows.T`` computed a block row at a time, by the number of rows:
#: measured on 2 CPU cores, blocks of 128-256 rows took 0.67x the full product at N = 1024 (K = 14,000) and 0.75x at
#: N = 256; below 256 rows the product is bound by memory traffic and blocks save nothing.
def _symmetric_block(n: int) -> int:
    return 256 if n >= 1024 else 128


def self_gram(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` [N, N] for rows [N, k], each block above the diagonal computed once and mirrored.

    The Gram matrix of a set with itself is symmetric, so half of a plain product is redundant; a block row at a
    time, against the rows from its diagonal block on, does about (1 + 1 / B) / 2 of the work for B blocks.
    """
    n = rows.shape[0]
    block = _symmetric_block(n)
    if n <= block:
        return rows @ rows.T
    out = rows.new_empty(n, n)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        strip = rows[r0:r1] @ rows[r0:].T  # [r1 - r0, n - r0]: the diagonal block and everything right of it
        out[r0:r1, r0:] = strip
        out[r1:, r0:r1] = strip[:, r1 - r0 :].T
    return out


def _padded_cat(parts: list[Tensor]) -> Tensor:
    """``parts`` [B_k, T_k, ...] joined along dim 0, each zero-padded along dim 1 to the longest T."""
    longest = max(part.shape[1] for part in parts)
    padded = [
        part
        if part.shape[1] == longest
        else torch.cat([part, part.new_zeros(part.shape[0], longest - part.shape[1], *part.shape[2:])], dim=1)
        for part in parts
    ]
    return torch.cat(padded)


def cross_gram(rows: Any, cols: Any) -> Tensor:
    """The Gram matrix between two terms of one parameter, even of different forms.

    Rows and columns of different lengths (a padded batch against an unpadded one) can take different forms; those
    are multiplied through their per-example gradients.
    """
    if type(rows) is type(cols):
        return rows.gram(cols)
    return rows.per_example() @ cols.per_example().T


def join_chunks(parts: list[Any]) -> Any:
    """One term from the terms of consecutive chunks; chunks of different lengths may have taken different forms,
    which are then joined as per-example gradients."""
    if len(parts) == 1:
        return parts[0]
    if all(type(part) is type(parts[0]) for part in parts):
        return type(parts[0]).concat(parts)
    return PerExampleTerm(torch.cat([part.per_example() for part in parts]))


def _tensors(term: Any) -> list[Tensor]:
    """The tensors of ``term`` indexed by example, in a fixed order."""
    found: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        found.append(t)
        return t

    term.map_rows(keep)
    return found


def _empty_rows_like(t: Tensor, total: int) -> Tensor:
    """An empty tensor of ``total`` rows shaped like ``t``'s rows, its dimensions laid out in memory as ``t``'s are (a
    convolution's output gradients [N, L, C] are a transposed view of [N, C, L]): copying into it is then a plain
    copy, and the view's consumers find the layout they expect."""
    order = sorted(range(1, t.dim()), key=lambda d: -t.stride()[d])
    return torch.empty_permuted((total, *t.shape[1:]), (0, *order), dtype=t.dtype, device=t.device)


class ChunkFiller:
    """A parameter's terms over all ``total`` examples, from the terms of consecutive chunks.

    The first chunk's term gives the structure; its tensors are allocated for all examples at once and every chunk
    is copied into its rows, so the factors are never held twice (as a list of chunks and joined). Chunks whose
    structure differs (padded to other lengths, another form) are joined by :func:`join_chunks` instead.
    """

    def __init__(self, total: int) -> None:
        self.total, self.filled = total, 0
        self.full: Any = None
        self.parts: list[Any] = []

    def add(self, term: Any) -> None:
        count = term.num_examples
        if self.full is None and not self.parts and count == self.total:  # one chunk: nothing to join, nor copy
            self.full, self.filled = term, count
            return
        if self.full is None and not self.parts:
            self.full = term.map_rows(lambda t: _empty_rows_like(t, self.total))
        if self.full is not None and self._fits(term):
            for target, source in zip(_tensors(self.full), _tensors(term), strict=True):
                target[self.filled : self.filled + count].copy_(source)
            self.filled += count
            return
        if self.full is not None:  # the structure changed: what was filled becomes the first part
            filled = self.filled
            self.parts, self.full = [self.full.map_rows(lambda t: t[:filled])], None
        self.parts.append(term)

    def _fits(self, term: Any) -> bool:
        mine, theirs = _tensors(self.full), _tensors(term)
        return (
            type(term) is type(self.full)
            and len(mine) == len(theirs)
            and all(a.shape[1:] == b.shape[1:] and a.dtype == b.dtype for a, b in zip(mine, theirs, strict=True))
        )

    def result(self) -> Any:
        """The term over every example added."""
        if self.full is not None:
            return self.full if self.filled == self.total else self.full.map_rows(lambda t: t[: self.filled])
        return join_chunks(self.parts)


def per_example_gradients(
    activations: Tensor | LazyPositions, backprops: Tensor, start: int, stop: int, out: Tensor | None = None
) -> Tensor:
    """sum_t b_it a_it^T for examples [start, stop), flattened like the weight: [stop - start, p * d].

    ``out`` (at least [stop - start, p * d]) is written into when given: reusing one buffer for every block avoids
    faulting in fresh memory for each, which costs more than the products themselves on the CPU.
    """
    count, p = stop - start, backprops.shape[2]
    if isinstance(activations, LazyPositions) and activations.gradients is not None:
        rows = activations.gradients(activations.source[start:stop], backprops[start:stop])
        return rows if out is None else out[:count].copy_(rows)
    a = activations[start:stop]
    if out is None:
        return torch.bmm(backprops[start:stop].transpose(1, 2), a).reshape(count, -1)
    target = out[:count]
    torch.bmm(backprops[start:stop].transpose(1, 2), a, out=target.view(count, p, a.shape[2]))
    return target


@dataclass
class OuterTerm:
    """g_i = b_i a_i^T: activations a [N, d] and output gradients b [N, p]."""

    activations: Tensor
    backprops: Tensor
    form = "outer"

    def gram(self, other: "OuterTerm") -> Tensor:
        if other is self:
            return self_gram(self.activations) * self_gram(self.backprops)
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
        return self_gram(self.rows) if other is self else self.rows @ other.rows.T

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
            return type(self)(self.activations.like(fn(self.activations.source)), fn(self.backprops))
        return type(self)(fn(self.activations), fn(self.backprops))

    @classmethod
    def concat(cls, terms: list["_PositionsTerm"]) -> "_PositionsTerm":
        first = terms[0].activations
        if isinstance(first, LazyPositions):
            sources = [t.activations.source for t in terms if isinstance(t.activations, LazyPositions)]
            return cls(first.like(torch.cat(sources)), torch.cat([t.backprops for t in terms]))
        # Chunks padded to their own longest example have different T: zero positions add nothing to sum_t b a^T.
        activations = [t.activations for t in terms if isinstance(t.activations, Tensor)]
        return cls(_padded_cat(activations), _padded_cat([t.backprops for t in terms]))


class GhostTerm(_PositionsTerm):
    """g_i = sum_t b_it a_it^T, computed in the ghost form."""

    activations: Tensor  # all positions at once (patches formed): the form multiplies them by blocks of rows
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
        block = min(max(n, m), _rows_per_block(2 * size * self.backprops.element_size()))
        out = torch.empty(n, m, dtype=self.backprops.dtype, device=self.backprops.device)
        same = other is self
        row_buffer = self.backprops.new_empty(min(n, block), size)
        col_buffer = None if same and n <= block else self.backprops.new_empty(min(m, block), size)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            rows = per_example_gradients(self.activations, self.backprops, r0, r1, row_buffer)
            for c0 in range(r0 if same else 0, m, block):
                c1 = min(m, c0 + block)
                if same and c0 == r0:
                    out[r0:r1, c0:c1] = self_gram(rows)
                    continue
                cols = per_example_gradients(other.activations, other.backprops, c0, c1, col_buffer)
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
    # Per-example gradients are formed now and kept when they are no larger than the factors they come from
    # (convolutions: few weights, many positions) and fit the budget; otherwise (a transformer's projections: d p
    # above T (d + p)) the factors are kept and each layer's gradients are formed a block at a time when its Gram
    # matrix is computed, so that only one layer's are ever held.
    fits = (n + m) * d * p * backprops.element_size() <= PER_EXAMPLE_BYTES
    if fits and d * p <= t * (d + p):
        return PerExampleTerm(per_example_gradients(activations, backprops, 0, activations.shape[0]))
    return BlockedTerm(activations, backprops)


@dataclass
class TokenTerm:
    """An embedding table's per-example gradients, g_i = sum_t onehot(id_it) b_it^T, kept sparse.

    Each example's gradient has a row for each distinct token it holds (the rows of a repeated token summed), so
    <g_i, g'_j> = sum over the tokens both hold of the two rows' dot product. The Gram matrix is built from the pairs
    of entries with equal tokens only: for each token, (examples holding it on one side) x (on the other) dot products
    of length d, far fewer than the (N T)^2 of a ghost form unless most tokens are shared by most examples.

    Attributes:
        ids: [N, T] token ids; backprops: [N, T, d] the output gradients at each position (zero where no gradient
            reaches the table, as at ``padding_idx``); num_embeddings: V, the table's rows.
    """

    ids: Tensor
    backprops: Tensor
    num_embeddings: int
    form = "tokens"

    @property
    def num_examples(self) -> int:
        return self.ids.shape[0]

    def _entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(example [K], token [K], summed rows [K, d]): one entry per distinct (example, token)."""
        n, t = self.ids.shape
        key = torch.arange(n, device=self.ids.device).repeat_interleave(t) * self.num_embeddings + self.ids.reshape(-1)
        unique, inverse = torch.unique(key, return_inverse=True)
        rows = self.backprops.new_zeros(unique.shape[0], self.backprops.shape[-1])
        rows.index_add_(0, inverse, self.backprops.reshape(n * t, -1))
        return unique // self.num_embeddings, unique % self.num_embeddings, rows

    def gram(self, other: "TokenTerm") -> Tensor:
        row_example, row_ids, row_values = self._entries()
        col_example, col_ids, col_values = (row_example, row_ids, row_values) if other is self else other._entries()
        out = row_values.new_zeros(self.num_examples, other.num_examples)
        col_ids, col_order = col_ids.sort()
        low = torch.searchsorted(col_ids, row_ids, side="left")
        counts = torch.searchsorted(col_ids, row_ids, side="right") - low
        pairs_per_block = _rows_per_block(2 * row_values.shape[1] * row_values.element_size())
        start = 0
        while start < row_ids.shape[0]:  # blocks of row entries with at most `pairs_per_block` pairs (at least one)
            cumulative = counts[start:].cumsum(0)
            stop = start + max(1, int((cumulative <= pairs_per_block).sum()))
            repeats = counts[start:stop]
            row = torch.arange(start, stop, device=row_ids.device).repeat_interleave(repeats)
            first = (torch.cumsum(repeats, 0) - repeats).repeat_interleave(repeats)
            col = col_order[low[row] + torch.arange(row.shape[0], device=row.device) - first]
            dots = (row_values[row] * col_values[col]).sum(dim=1)
            out.index_put_((row_example[row], col_example[col]), dots, accumulate=True)
            start = stop
        return out

    def per_example(self) -> Tensor:
        n, d = self.ids.shape[0], self.backprops.shape[-1]
        out = self.backprops.new_zeros(n, self.num_embeddings, d)
        out.scatter_add_(1, self.ids.unsqueeze(-1).expand(-1, -1, d), self.backprops)
        return out.reshape(n, -1)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "TokenTerm":
        return type(self)(fn(self.ids), fn(self.backprops), self.num_embeddings)

    @classmethod
    def concat(cls, terms: list["TokenTerm"]) -> "TokenTerm":
        # Padded positions hold token 0 with a zero gradient row: they add nothing to any dot product.
        return cls(
            _padded_cat([t.ids for t in terms]), _padded_cat([t.backprops for t in terms]), terms[0].num_embeddings
        )


@dataclass
class SlicedTerm:
    """A parameter used through row slices of its dim 0 (a packed projection split into query, key and value).

    Slices are disjoint, so the Gram matrix is the sum of the slices' and the per-example gradient their placement.

    Attributes:
        parts: ((start, stop) rows of dim 0, the term of those rows) per slice.
        row_numel: entries in one row of dim 0; numel: entries of the whole parameter.
    """

    parts: list[tuple[tuple[int, int], Any]]
    row_numel: int
    numel: int

    @property
    def form(self) -> str:
        return "+".join(dict.fromkeys(term.form for _, term in self.parts))

    @property
    def num_examples(self) -> int:
        return self.parts[0][1].num_examples

    def gram(self, other: "SlicedTerm") -> Tensor:
        pairs = list(zip(self.parts, other.parts, strict=True))
        total = cross_gram(pairs[0][0][1], pairs[0][1][1])
        for (_, mine), (_, theirs) in pairs[1:]:
            total.add_(cross_gram(mine, theirs))
        return total

    def per_example(self) -> Tensor:
        first = self.parts[0][1].per_example()
        out = first.new_zeros(first.shape[0], self.numel)
        for (start, stop), term in self.parts:
            out[:, start * self.row_numel : stop * self.row_numel] = term.per_example()
        return out

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "SlicedTerm":
        return SlicedTerm([(rows, term.map_rows(fn)) for rows, term in self.parts], self.row_numel, self.numel)

    @classmethod
    def concat(cls, terms: list["SlicedTerm"]) -> "SlicedTerm":
        parts = [(rows, join_chunks([t.parts[i][1] for t in terms])) for i, (rows, _) in enumerate(terms[0].parts)]
        return cls(parts, terms[0].row_numel, terms[0].numel)


@runtime_checkable
class Term(Protocol):
    """What every factored form provides (:class:`OuterTerm`, :class:`FlatTerm`, :class:`PerExampleTerm`,
    :class:`GhostTerm`, :class:`BlockedTerm`, :class:`TokenTerm`, :class:`SlicedTerm`, and a user rule's own).

    """

    @property
    def form(self) -> str:
        """The form's name, as :class:`~lightning_stiffness.gram.GramPlan` reports it."""
        ...

    @property
    def num_examples(self) -> int:
        """N, the examples along dim 0 of every tensor the term holds."""
        ...

    def gram(self, other: Any) -> Tensor:
        """<g_i, g'_j> [N, M] against a term of the same form over M examples (itself for a square matrix)."""
        ...

    def per_example(self) -> Tensor:
        """The per-example gradients [N, numel], flattened like the parameter (the check, mixed forms)."""
        ...

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Any:
        """The same term with ``fn`` applied to each tensor indexed by example (slicing, gathering)."""
        ...

    @classmethod
    def concat(cls, terms: list[Any]) -> Any:
        """One term of this form over the examples of ``terms`` (consecutive chunks), in order."""
        ...
