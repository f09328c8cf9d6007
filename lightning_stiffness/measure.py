"""Deprecated (removed in 0.2): ``lightning_stiffness.measure`` became :mod:`lightning_stiffness.measures`.

``StiffnessResult`` is ``lightning_stiffness.StiffnessResult`` (defined in :mod:`lightning_stiffness.measures.result`);
``measure_stiffness`` and ``GramRows`` are in :mod:`lightning_stiffness.measures.probe_measures`.
"""

from lightning_stiffness.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        "StiffnessResult": "lightning_stiffness",
        "GramRows": "lightning_stiffness.measures.probe_measures",
        "measure_stiffness": "lightning_stiffness.measures.probe_measures",
    },
)
