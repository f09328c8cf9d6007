"""Argument checks shared by the functional API, the metrics and the callback (which turns them into
``MisconfigurationException``)."""

from collections.abc import Collection
from typing import Any


def check_int(value: Any, name: str, minimum: int = 1, alternative: str = "") -> int:
    """``value`` when it is an integer (not a bool) of at least ``minimum``.

    Args:
        value: the argument.
        name: the argument's name, for the message.
        minimum: the smallest value allowed.
        alternative: what else the argument may be, for the message (``"or a tensor of edges"``).

    Raises:
        ValueError: naming the argument, what it must be and what it was.

    Example::

        >>> check_int(0, "bins")
        Traceback (most recent call last):
        ...
        ValueError: `bins` must be a positive integer, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"`{name}` must be {wanted}{' ' + alternative if alternative else ''}, got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """``value`` when it is one of ``choices``.

    Raises:
        ValueError: naming the argument, the choices and what it was.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value
