"""Deprecated (removed in 0.2): the torchmetrics classes moved to :mod:`lightning_stiffness.measures.metrics`."""

from lightning_stiffness.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        name: "lightning_stiffness.measures.metrics"
        for name in ("ClassStiffness", "GradientAlignment", "StiffnessByDistance", "block_stiffness")
    },
)
