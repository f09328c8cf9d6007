"""Old import paths kept for one release: a module ``__getattr__`` (PEP 562) that warns and hands on a moved name.

A module that moved leaves a small module at its old path whose ``__getattr__ = moved(__name__, {...})``: getting
one of its old names (``from lightning_stiffness.measure import StiffnessResult``) warns with a
``DeprecationWarning`` naming the new path, and returns the very object found there.
"""

import importlib
import warnings
from collections.abc import Callable
from typing import Any

#: The release that removes the old paths.
REMOVED_IN = "0.2"


def moved(old: str, new_homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the module ``old``, whose names moved to the modules ``new_homes`` names.

    Args:
        old: the old module's name (its ``__name__``).
        new_homes: each old name -> the module to import it from now.

    Returns:
        ``__getattr__(name)``: warns and returns the name from its new module; an ``AttributeError`` (and no
        warning) for any other name.

    Example::

        >>> import warnings
        >>> getattr_ = moved("old.place", {"sqrt": "math"})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     root = getattr_("sqrt")
        >>> root(4.0), caught[0].category.__name__
        (2.0, 'DeprecationWarning')
        >>> str(caught[0].message)
        '`old.place.sqrt` is deprecated and will be removed in lightning-stiffness 0.2: use `math.sqrt`.'
    """

    def __getattr__(name: str) -> Any:
        if name not in new_homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        new = new_homes[name]
        message = f"`{old}.{name}` is deprecated and will be removed in lightning-stiffness {REMOVED_IN}"
        warnings.warn(f"{message}: use `{new}.{name}`.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
