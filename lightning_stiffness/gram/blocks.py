"""Gram matrices from per-example gradients, block by block: shared by the torch.func and loop engines.

An engine that forms per-example gradients explicitly (N x P numbers) never holds them all: it keeps a *panel* of
rows and streams blocks of columns through it, computing each block of the Gram matrix as a sum over parameters of
``J_rows @ J_cols.T``. Only the upper triangle of a square Gram matrix is computed.
"""

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lightning_stiffness.gram.inputs import Inputs, take

#: Bytes the engine may spend on per-example gradients held at once when ``chunk_size`` is not given.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3

Progress = Callable[[int, int], None] | None
Gradients = dict[str, Tensor]
#: ``(inputs [B, ...], targets [B, ...]) -> name -> [B, *param.shape]``: per-example gradients of a block.
PerExampleFn = Callable[[Inputs, Tensor], Gradients]


def gram_of(rows: Gradients, cols: Gradients, names: list[str] | None = None) -> Tensor:
    """sum over parameters (``names``, default all) of rows[name] @ cols[name].T, without concatenating them."""
    out = None
    for name in names if names is not None else list(rows):
        g, h = rows[name], cols[name]
        if g.element_size() < 4:  # half precision: products and sums in float32
            g, h = g.float(), h.float()
        block = g.reshape(g.shape[0], -1) @ h.reshape(h.shape[0], -1).T
        out = block if out is None else out.add_(block)
    assert out is not None
    return out


def default_chunk_size(params: dict[str, Tensor], memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Examples per block so that a panel and a block of per-example gradients fit in ``memory_budget`` bytes."""
    bytes_per_example = sum(p.numel() * p.element_size() for p in params.values())
    # A block is a quarter of the budget; the panel of rows takes the rest (see `blocked_gram`).
    return max(1, memory_budget // (4 * bytes_per_example))


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def blocked_gram(
    per_example: PerExampleFn,
    params: dict[str, Tensor],
    inputs: Inputs,
    targets: Tensor,
    inputs2: Inputs | None = None,
    targets2: Tensor | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress = None,
    groups: dict[str, str] | None = None,
) -> dict[str, Tensor]:
    """Gram matrices of per-example gradients, [N, M], computed block by block (see the module docstring).

    ``chunk_size`` examples go through one ``per_example`` call; the panel of rows held while column blocks stream
    through it is three blocks, so at most four blocks of per-example gradients are alive at once.

    Returns:
        group name -> the Gram matrix of that group's parameters, with ``groups`` mapping each parameter name to its
        group; without ``groups``, one entry ``""`` for all parameters.
    """
    members: dict[str, list[str]] = {}
    for name in params:
        members.setdefault(groups[name] if groups is not None else "", []).append(name)
    block = chunk_size or default_chunk_size(params)
    panel = 3 * block
    square = inputs2 is None or targets2 is None  # given together (checked by gradient_gram)
    cols_x, cols_y = (inputs, targets) if inputs2 is None or targets2 is None else (inputs2, targets2)
    n, m = targets.shape[0], cols_y.shape[0]
    out = {group: torch.empty(n, m, dtype=dtype, device=targets.device) for group in members}

    # When every column fits in one block, compute the column gradients once instead of once per panel.
    cached_cols = per_example(cols_x, cols_y) if (not square and m <= block) else None
    panels = list(_spans(n, panel))
    total = sum(math.ceil(((m - p0) if square else m) / block) for p0, _ in panels)
    done = 0
    for p0, p1 in panels:
        rows = per_example(take(inputs, slice(p0, p1)), targets[p0:p1])
        col_start = p0 if square else 0
        for c0, c1 in _spans(m - col_start, block):
            c0, c1 = c0 + col_start, c1 + col_start
            if cached_cols is not None:
                cols = cached_cols
            elif square and c1 <= p1:
                # Columns inside the panel: reuse its gradients.
                cols = {name: g[c0 - p0 : c1 - p0] for name, g in rows.items()}
            else:
                cols = per_example(take(cols_x, slice(c0, c1)), cols_y[c0:c1])
            for group, names in members.items():
                out[group][p0:p1, c0:c1] = gram_of(rows, cols, names).to(dtype)
                if square and c0 >= p1:
                    out[group][c0:c1, p0:p1] = out[group][p0:p1, c0:c1].T
            done += 1
            if progress is not None:
                progress(done, total)
    return out
