r"""Stiffness measures on tensors, usable without Lightning: the public functional namespace.

Definitions follow Fort, Nowak, Jastrzebski and Narayanan, "Stiffness: A New Perspective on Generalization in Neural
Networks" (arXiv 1901.09491). With :math:`g_i = \nabla_\theta \ell(f(x_i), y_i)` the gradient of example
:math:`i`'s own loss and :math:`G_{ij} = g_i \cdot g'_j` (:func:`gradient_gram`):

- cosine stiffness :math:`\cos(g_i, g'_j) = G_{ij} / (|g_i| |g'_j|)` (:func:`cosine_stiffness`);
- sign stiffness :math:`\operatorname{sign}(G_{ij})` (:func:`sign_stiffness`);
- the class stiffness matrix :math:`C_{ab}`, the mean stiffness over pairs with :math:`i` in class :math:`a` and
  :math:`j` in class :math:`b`, :math:`i \neq j` (:func:`class_stiffness`), its diagonal mean (within-class) and
  off-diagonal mean (between-class) (:func:`within_between`);
- stiffness against the distance between examples (:func:`pairwise_distances`, :func:`stiffness_by_distance`) and the
  stiff-domain size :math:`\xi`, where a least-squares line through (distance, stiffness) crosses zero
  (:func:`critical_distance`);
- the gradient coherence and diversity of a set (:func:`gradient_coherence`, :func:`gradient_diversity`);
- class stiffness over every pair of a whole dataset, in memory independent of its size
  (:func:`dataset_class_stiffness`).

Positive stiffness between :math:`i` and :math:`j`: a small gradient step on :math:`i` also lowers the loss on
:math:`j`. Entries that are not finite (NaN from an example with a zero gradient) are left out of every mean and fit.

The functions live where they belong (:mod:`lightning_stiffness.measures.functional`, :mod:`lightning_stiffness.gram`,
:mod:`lightning_stiffness.measures.whole_dataset`, :mod:`lightning_stiffness.measures.representations`); this module
hands them on under one name, as ``torchmetrics.functional`` does.
"""

from lightning_stiffness.gram import METHODS, gradient_gram
from lightning_stiffness.measures.functional import (
    DistanceCurve,
    class_stiffness,
    cosine_stiffness,
    critical_distance,
    distance_bin_edges,
    gradient_coherence,
    gradient_diversity,
    pairwise_distances,
    sign_stiffness,
    stiffness_by_distance,
    within_between,
)
from lightning_stiffness.measures.representations import layer_outputs
from lightning_stiffness.measures.whole_dataset import dataset_class_stiffness

__all__ = [
    "METHODS",
    "DistanceCurve",
    "class_stiffness",
    "cosine_stiffness",
    "critical_distance",
    "dataset_class_stiffness",
    "distance_bin_edges",
    "gradient_coherence",
    "gradient_diversity",
    "gradient_gram",
    "layer_outputs",
    "pairwise_distances",
    "sign_stiffness",
    "stiffness_by_distance",
    "within_between",
]
