"""Splitting a probe across processes (DDP) behind one small object, :class:`Communicator`.

Every process holds all probe examples (drawn once on rank 0 and broadcast) and computes the rows of the Gram matrix
of its own contiguous share of them against all examples: the factored engine gathers each layer's factors for the
columns from all processes (:meth:`Communicator.term_gatherer`) instead of recomputing them. The squared norms (the
diagonal) are summed across processes; the whole matrix is gathered only when raw results are saved. Failures are
agreed on, so that all processes skip a probe together and none waits in a collective call. With one process every
method is an identity, so the probe code is the same with and without DDP.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from lightning_stiffness.exceptions import AgreedFailure, FailedElsewhere, is_expected

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import Strategy

    from lightning_stiffness.gram.rules import Term

T = TypeVar("T")


def row_span(total: int, world_size: int, rank: int) -> slice:
    """The contiguous share of ``total`` rows that process ``rank`` of ``world_size`` computes."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class Communicator:
    """The collective operations of a probe over a Lightning strategy's processes.

    Args:
        strategy: the trainer's strategy (its ``broadcast``, ``reduce``, ``all_gather``,
            ``reduce_boolean_decision``); not used with one process.
        world_size: the number of processes.
        rank: this process's global rank.

    Example::

        >>> single = Communicator()
        >>> single.span(10), single.agree(None)
        (slice(0, 10, None), None)
    """

    def __init__(self, strategy: "Strategy | None" = None, world_size: int = 1, rank: int = 0) -> None:
        if world_size > 1 and strategy is None:
            raise ValueError("a `strategy` is needed for more than one process.")
        self.strategy, self.world_size, self.rank = strategy, world_size, rank

    @classmethod
    def from_trainer(cls, trainer: "Trainer") -> "Communicator":
        return cls(trainer.strategy, trainer.world_size, trainer.global_rank)

    @property
    def _strategy(self) -> "Strategy":
        """The strategy, for a collective call: one is made only with more than one process, which needs one."""
        if self.strategy is None:
            raise RuntimeError(f"a Communicator of {self.world_size} processes was left without a `strategy`.")
        return self.strategy

    def span(self, total: int) -> slice:
        """This process's share of ``total`` rows."""
        return row_span(total, self.world_size, self.rank)

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every process."""
        return tensor if self.world_size == 1 else self._strategy.broadcast(tensor, src=0)

    def agree(self, error: BaseException | None) -> BaseException | None:
        """Every process learns whether any failed, and why, so that all skip the probe together and none waits.

        Returns this process's own error, or, where it succeeded but another failed, a :class:`FailedElsewhere`
        carrying that cause (and whether it was an expected failure).
        """
        if self.world_size == 1:
            return error
        if not self._strategy.reduce_boolean_decision(error is not None, all=False):
            return None
        if error is not None:
            self._gather_objects((f"on process {self.rank}: {type(error).__name__}: {error}", is_expected(error)))
            return error
        reports = [report for report in self._gather_objects(None) if report is not None]
        message, expected = reports[0] if reports else ("the probe failed on another process", True)
        return FailedElsewhere(message, expected=expected and all(r[1] for r in reports))

    def agreed(self, compute: Callable[[], T]) -> T:
        """``compute()``, once all processes have agreed that none of them failed in theirs.

        Raises:
            BaseException: this process's error, or a :class:`FailedElsewhere` when another process failed.
        """
        error: BaseException | None = None
        try:
            value = compute()
        except AgreedFailure as agreed:  # the agreement already took place (in a gather of `term_gatherer`)
            raise agreed.cause from None
        except Exception as err:
            error = err
        error = self.agree(error)
        if error is not None:
            raise error
        return value

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (itself with one)."""
        return tensor if self.world_size == 1 else self._strategy.reduce(tensor, reduce_op="sum")

    def all_norms(self, rows: Tensor, span: slice, total: int) -> Tensor:
        """The diagonal of the Gram matrix [total], from each process's rows [R, total] of the span it holds."""
        local = rows.new_zeros(total)
        if rows.numel():
            local[span] = rows[:, span].diagonal()
        return local if self.world_size == 1 else self._strategy.reduce(local, reduce_op="sum")

    def gather_rows(self, rows: Tensor, total: int) -> Tensor:
        """All ``total`` rows, in order, from each process's share ``rows`` [span length, ...].

        all_gather needs equal shapes, so shares are padded to the longest and cut back after. A process with an
        empty span may pass extra rows: they are dropped.
        """
        if self.world_size == 1:
            return rows
        spans = [row_span(total, self.world_size, r) for r in range(self.world_size)]
        height = max(s.stop - s.start for s in spans)
        padded = rows.new_zeros((height, *rows.shape[1:]))
        kept = min(height, rows.shape[0])
        padded[:kept] = rows[:kept]
        gathered = self._strategy.all_gather(padded)  # [world_size, height, ...]
        return torch.cat([gathered[r, : s.stop - s.start] for r, s in enumerate(spans)])

    def term_gatherer(self, total: int) -> "Callable[[Term], Term]":
        """For the factored engine: a term over this process's rows -> the same term over all ``total`` examples.

        Before its first gather it holds the agreement of the Gram phase (:meth:`agree`): a process whose own rows
        failed to compute calls that agreement from its error handler instead (:meth:`agreed`), so nobody waits in a
        gather that one process will never join. When the agreement finds a failure, :class:`AgreedFailure` is raised
        here.
        """
        agreed = False

        def gather(term: "Term") -> "Term":
            nonlocal agreed
            if not agreed:
                agreed = True
                error = self.agree(None)
                if error is not None:
                    raise AgreedFailure(error)
            return term.map_rows(lambda rows: self.gather_rows(rows, total))

        return gather

    def _gather_objects(self, mine: Any) -> list[Any]:
        """Every process's ``mine``, by rank."""
        gathered = [mine] * self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_gather_object(gathered, mine)
        return gathered
