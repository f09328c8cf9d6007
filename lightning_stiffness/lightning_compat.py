"""Lightning classes from both packages: ``lightning.pytorch`` and, when installed, the standalone
``pytorch_lightning``, so that ``isinstance`` checks recognise either."""

import importlib


def lightning_classes(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``lightning.pytorch.{module}`` and of ``pytorch_lightning.{module}`` if importable.

    Example::

        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> TensorBoardLogger in lightning_classes("loggers", "TensorBoardLogger")
        True
    """
    found: list[type] = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            namespace = importlib.import_module(f"{package}.{module}")
        except ImportError:
            continue
        found += [getattr(namespace, name) for name in names if hasattr(namespace, name)]
    return tuple(dict.fromkeys(found))
