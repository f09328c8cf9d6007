"""When the callback probes: at initialisation, at the end of chosen epochs, after chosen optimiser steps.

Epochs are Lightning's (0-based ``trainer.current_epoch``); steps are ``trainer.global_step`` (optimiser steps taken),
checked after each training batch. Epoch and step schedules combine; a step is never probed twice (the end of an
epoch whose last step was just probed is not probed again).

Example::

    >>> schedule = ProbeSchedule(epochs=None, every_n_epochs=1, steps=[10, 100], every_n_steps=None)
    >>> schedule.due_at_step(10), schedule.due_at_step(11), schedule.due_at_epoch_end(0, 10)
    (True, False, True)
    >>> schedule.done(10)
    >>> schedule.due_at_epoch_end(0, 10)
    False
"""

from lightning_stiffness.gram.validation import check_int


def _checked_list(values: list[int] | None, name: str, minimum: int) -> tuple[int, ...] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of {name.rstrip('s')} numbers, got {values!r}.")
    for value in values:
        check_int(value, name, minimum=minimum)
    return tuple(sorted(set(values)))


class ProbeSchedule:
    """The probe schedule, checked. Raises ``ValueError`` naming the argument that is out of range.

    Args:
        epochs: epochs at whose end to probe. Cannot be combined with ``every_n_epochs``.
        every_n_epochs: probe at the end of every n-th epoch; 0 for none. Default: 1, unless ``epochs`` or a step
            schedule is given (then 0).
        steps: global steps (>= 1) after which to probe.
        every_n_steps: probe after every n-th optimiser step.
        at_start: probe before the first optimiser step.
    """

    def __init__(
        self,
        epochs: list[int] | None,
        every_n_epochs: int | None,
        steps: list[int] | None,
        every_n_steps: int | None,
        at_start: bool = True,
    ) -> None:
        self.epochs = _checked_list(epochs, "epochs", 0)
        if epochs is not None and every_n_epochs is not None:
            raise ValueError("Give either `epochs` or `every_n_epochs`, not both.")
        if every_n_epochs is not None:
            check_int(every_n_epochs, "every_n_epochs", minimum=0)
        self.steps = _checked_list(steps, "steps", 1) or ()
        if every_n_steps is not None:
            check_int(every_n_steps, "every_n_steps")
        self.every_n_steps = every_n_steps or 0
        by_steps = bool(self.steps or self.every_n_steps)
        default = 0 if (epochs is not None or by_steps) else 1
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else default
        self.at_start = at_start
        self._last_step: int | None = None

    def due_at_start(self, step: int) -> bool:
        """Probe when training starts: only a fresh run (step 0), not a resumed one."""
        return self.at_start and step == 0 and self._last_step != step

    def due_at_step(self, step: int) -> bool:
        """Probe after this training batch (``step`` optimiser steps taken)?"""
        if step == 0 or step == self._last_step:
            return False
        return step in self.steps or (self.every_n_steps > 0 and step % self.every_n_steps == 0)

    def due_at_epoch_end(self, epoch: int, step: int) -> bool:
        """Probe at the end of ``epoch`` (unless its last step was just probed)?"""
        if step == self._last_step:
            return False
        if self.epochs is not None:
            return epoch in self.epochs
        return self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0

    def reset(self) -> None:
        """Forget the last probe's step (a new fit starts)."""
        self._last_step = None

    def done(self, step: int) -> None:
        """Record a probe at ``step`` (also a failed one: the step is not tried again)."""
        self._last_step = step
