"""Splitting a probe's Gram matrix across processes (DDP): rows per process, norms and rows gathered.

Every process holds all probe examples (drawn once on rank 0 and broadcast) and computes the rows of the Gram matrix
of its own contiguous share of them against all examples: the factored engine gathers each layer's factors for the
columns from all processes (:func:`term_gatherer`) instead of recomputing them. The squared norms (the diagonal) are
summed across processes; the whole matrix is gathered only when raw results are saved. With one process these are
identities.
"""

from collections.abc import Callable

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from lightning_stiffness.gram.rules import Term


def row_span(total: int, world_size: int, rank: int) -> slice:
    """The contiguous share of ``total`` rows that process ``rank`` of ``world_size`` computes."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def agree_on_failure(strategy: Strategy, world_size: int, error: BaseException | None) -> BaseException | None:
    """Every process learns whether any failed, and why, so that all skip the probe together and none waits.

    Returns this process's own error, or, where it succeeded but another failed, an error carrying that cause.
    """
    if world_size == 1:
        return error
    if not strategy.reduce_boolean_decision(error is not None, all=False):
        return None
    mine = None if error is None else f"on process {strategy.global_rank}: {type(error).__name__}: {error}"
    messages: list[str | None] = [mine] * world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(messages, mine)
    if error is not None:
        return error
    return RuntimeError(next((m for m in messages if m), "the probe failed on another process"))


def all_norms(strategy: Strategy, world_size: int, rows: Tensor, span: slice, total: int) -> Tensor:
    """The diagonal of the Gram matrix [total], from each process's rows [R, total] of the span it holds."""
    local = rows.new_zeros(total)
    if rows.numel():
        local[span] = rows[:, span].diagonal()
    return local if world_size == 1 else strategy.reduce(local, reduce_op="sum")


def gather_rows(strategy: Strategy, world_size: int, rows: Tensor, total: int) -> Tensor:
    """All ``total`` rows, in order, from each process's share ``rows`` [span length, ...] (dim 0 indexes examples).

    all_gather needs equal shapes, so shares are padded to the longest and cut back after. A process with an empty
    span may pass extra rows: they are dropped.
    """
    if world_size == 1:
        return rows
    spans = [row_span(total, world_size, r) for r in range(world_size)]
    height = max(s.stop - s.start for s in spans)
    padded = rows.new_zeros((height, *rows.shape[1:]))
    kept = min(height, rows.shape[0])
    padded[:kept] = rows[:kept]
    gathered = strategy.all_gather(padded)  # [world_size, height, ...]
    return torch.cat([gathered[r, : s.stop - s.start] for r, s in enumerate(spans)])


class AgreedFailure(RuntimeError):
    """All processes have agreed that a probe failed (``cause`` says where and why); no more agreement is due."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def term_gatherer(strategy: Strategy, world_size: int, total: int) -> Callable[[Term], Term]:
    """For the factored engine: a term over this process's rows -> the same term over all ``total`` examples.

    Before its first gather it holds the agreement of the Gram phase (:func:`agree_on_failure`): a process whose own
    rows failed to compute calls that agreement from its error handler instead, so nobody waits in a gather that one
    process will never join. When the agreement finds a failure, :class:`AgreedFailure` is raised here.
    """
    agreed = False

    def gather(term: Term) -> Term:
        nonlocal agreed
        if not agreed:
            agreed = True
            error = agree_on_failure(strategy, world_size, None)
            if error is not None:
                raise AgreedFailure(error)
        return term.map_rows(lambda rows: gather_rows(strategy, world_size, rows, total))

    return gather
