"""lightning-stiffness: gradient stiffness (Fort et al., arXiv 1901.09491) measured while a model trains.

``lightning_stiffness.functional`` is plain PyTorch; ``StiffnessCallback`` (Lightning) and ``StiffnessResult`` (what a
probe measured, as its raw file holds it) are imported on first use, so the functional API works without Lightning
installed.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["StiffnessCallback", "StiffnessResult", "__version__", "functional"]


def __getattr__(name: str) -> Any:
    if name == "StiffnessCallback":
        from lightning_stiffness.callback import StiffnessCallback

        return StiffnessCallback
    if name == "StiffnessResult":
        from lightning_stiffness.measures.result import StiffnessResult

        return StiffnessResult
    if name == "functional":
        import lightning_stiffness.functional as functional

        return functional
    raise AttributeError(f"module 'lightning_stiffness' has no attribute {name!r}")
