"""Every exception the package raises on purpose, and which probe failures are expected.

A probe must not stop training for what can happen to any model: a non-finite loss, running out of memory, or such a
failure on another process. Anything else is a bug, here or in the user's code; ``StiffnessCallback(strict=True)``
raises it (the test suite turns strict mode on through the ``LIGHTNING_STIFFNESS_STRICT`` environment variable), and
otherwise it is skipped with a warning as well.

Wrong arguments raise ``ValueError`` naming the argument (:mod:`lightning_stiffness.gram.validation`); the callback
turns them into Lightning's ``MisconfigurationException``.
"""

import os

import torch

#: Environment variable that turns strict mode on when ``StiffnessCallback(strict=None)`` (``1``, ``true``, ``yes``).
STRICT_ENV = "LIGHTNING_STIFFNESS_STRICT"


class ProbeSkipped(RuntimeError):
    """A probe that cannot give a meaningful answer (for example, a non-finite loss on a probe example)."""


class FailedElsewhere(RuntimeError):
    """The probe failed on another process (the message says where and why); ``expected`` as there."""

    def __init__(self, message: str, expected: bool) -> None:
        super().__init__(message)
        self.expected = expected


class AgreedFailure(RuntimeError):
    """All processes have agreed that a probe failed (``cause`` says where and why); no more agreement is due."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ProbeDataError(ValueError):
    """The data cannot be probed: no labels, non-integer labels, an unreadable item layout."""


class ReportError(ValueError):
    """Nothing to report: a path without saved results, or a choice the results do not have."""


def is_expected(error: BaseException) -> bool:
    """Whether a probe failure is one that any model may meet (skipped with a warning even in strict mode)."""
    if isinstance(error, FailedElsewhere):
        return error.expected
    if isinstance(error, (ProbeSkipped, MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def strict_default() -> bool:
    """Strict mode as the environment sets it (off when ``LIGHTNING_STIFFNESS_STRICT`` is unset)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")
