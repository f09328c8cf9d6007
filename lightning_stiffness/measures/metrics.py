"""torchmetrics metrics that accumulate stiffness over blocks of a Gram matrix.

Beside the pure functions of :mod:`~lightning_stiffness.measures.functional`, as torchmetrics keeps ``functional``
beside its classes: each metric takes blocks of rows of a Gram matrix (with the squared gradient norms of the examples
on both sides), adds per-class-pair or per-bin sums and counts to its states, and reduces them across processes in
``compute()``. Any split of the pairs into blocks gives the result of the functional API on the whole matrix.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_stiffness.gram.validation import check_choice, check_int
from lightning_stiffness.measures.functional import (
    DistanceCurve,
    LineFitSums,
    binned_sums,
    class_pair_sums,
    coherence_from_sums,
    cosine_stiffness,
    critical_distance_from_sums,
    diversity_from_sums,
    line_sum_vector,
    mean_or_nan,
    sign_stiffness,
)
from lightning_stiffness.names import KINDS


def block_stiffness(kind: str, gram: Tensor, sq_norms: Tensor | None, sq_norms2: Tensor | None) -> Tensor:
    """``kind`` stiffness of a block of a Gram matrix, whose diagonal need not be the rows' norms.

    Raises:
        ValueError: for cosine stiffness without both sides' squared norms.
    """
    if kind == "cosine":
        if sq_norms is None or sq_norms2 is None:
            raise ValueError("cosine stiffness needs `sq_norms` and `sq_norms2` (squared gradient norms) for a block.")
        return cosine_stiffness(gram, sq_norms, sq_norms2)
    return sign_stiffness(gram)


class _ShapedMetric(Metric):
    """A metric whose ``compute()`` keeps its result's shape.

    torchmetrics squeezes one-element results (a 1 x 1 class matrix, a single bin). It wraps ``compute`` when a
    metric is built and again when one is unpickled or cloned; restoring the shape inside that wrapping keeps it
    through ``clone()``, ``pickle`` and ``sync``.
    """

    def _shaped(self, value: Any) -> Any:
        raise NotImplementedError

    def _wrap_compute(self, compute: Callable) -> Callable:
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def shaped(*args: Any, **kwargs: Any) -> Any:
            return self._shaped(wrapped(*args, **kwargs))

        return shaped


def _pair_mask(gram: Tensor, indices: Tensor | None, indices2: Tensor | None, mask: Tensor | None) -> Tensor:
    """Pairs of the block without self-pairs (same example index on both sides), within ``mask``."""
    keep = torch.ones(gram.shape, dtype=torch.bool, device=gram.device)
    if indices is not None and indices2 is not None:
        keep &= indices.to(gram.device)[:, None] != indices2.to(gram.device)[None, :]
    if mask is not None:
        keep &= mask.to(gram.device)
    return keep


class ClassStiffness(_ShapedMetric):
    r"""Class stiffness matrix accumulated over blocks of a Gram matrix.

    ``compute()`` gives C[a, b], the mean ``kind`` stiffness over the pairs seen with i in class a and j in class b,
    leaving out self-pairs (the same example index on both sides) and non-finite values; NaN where a class pair had
    no pairs. Equal to :func:`lightning_stiffness.functional.class_stiffness` on the whole matrix.

    Args:
        num_classes: C.
        kind: ``"cosine"`` or ``"sign"``.

    Example::

        >>> import torch
        >>> from lightning_stiffness.measures.metrics import ClassStiffness
        >>> g = torch.randn(6, 4)
        >>> gram, labels = g @ g.T, torch.tensor([0, 0, 1, 1, 2, 2])
        >>> metric = ClassStiffness(num_classes=3, kind="cosine")
        >>> norms, ids = gram.diagonal(), torch.arange(6)
        >>> for rows in (slice(0, 2), slice(2, 6)):  # any split of the rows
        ...     metric.update(gram[rows], labels[rows], labels, norms[rows], norms, ids[rows], ids)
        >>> metric.compute().shape
        torch.Size([3, 3])
    """

    sums: Tensor  # states registered by add_state, declared for type checkers
    counts: Tensor
    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, kind: str = "cosine", **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = check_int(num_classes, "num_classes")
        self.kind = check_choice(kind, "kind", KINDS)
        zeros = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.add_state("sums", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("counts", default=zeros.clone(), dist_reduce_fx="sum")

    def update(
        self,
        gram: Tensor,
        labels: Tensor,
        labels2: Tensor,
        sq_norms: Tensor | None = None,
        sq_norms2: Tensor | None = None,
        indices: Tensor | None = None,
        indices2: Tensor | None = None,
    ) -> None:
        """Add a block [n, m] of the Gram matrix.

        Args:
            gram: the block.
            labels: classes of its rows [n]; labels2: of its columns [m].
            sq_norms, sq_norms2: squared gradient norms of the rows and columns (needed for cosine stiffness).
            indices, indices2: example indices of the rows and columns; pairs with equal indices are self-pairs and
                are left out. None: no self-pairs in this block.
        """
        if gram.numel() == 0:
            return
        stiffness = block_stiffness(self.kind, gram, sq_norms, sq_norms2)
        valid = _pair_mask(gram, indices, indices2, None) & torch.isfinite(stiffness)
        sums, counts = class_pair_sums(stiffness, valid, labels, labels2, self.num_classes)
        self.sums += sums
        self.counts += counts

    def compute(self) -> Tensor:
        return mean_or_nan(self.sums, self.counts)

    def _shaped(self, value: Tensor) -> Tensor:
        return value.reshape(self.num_classes, self.num_classes)


class StiffnessByDistance(_ShapedMetric):
    r"""Mean stiffness in bins of distance, and the critical distance xi, accumulated over blocks of pairs.

    Per bin it keeps the sum and count of stiffness; for xi, the sums a least-squares line needs
    (:class:`~lightning_stiffness.measures.functional.LineFitSums`). ``compute()`` gives ``(curve, xi)``, equal to
    :func:`~lightning_stiffness.functional.stiffness_by_distance` with the same edges and
    :func:`~lightning_stiffness.functional.critical_distance` over the same pairs.

    Args:
        edges: increasing bin edges (pairs outside them count for xi but fall in no bin).
        kind: ``"cosine"`` or ``"sign"``.

    Example::

        >>> import torch
        >>> from lightning_stiffness.measures.metrics import StiffnessByDistance
        >>> metric = StiffnessByDistance(edges=torch.linspace(0, 2, 5), kind="sign")
        >>> gram = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
        >>> ids = torch.arange(2)
        >>> metric.update(gram, torch.tensor([[0.0, 0.3], [0.3, 0.0]]), indices=ids, indices2=ids)
        >>> curve, xi = metric.compute()
        >>> curve.count.tolist()
        [2, 0, 0, 0]
    """

    edges: Tensor  # a buffer, and states registered by add_state, declared for type checkers
    bin_sums: Tensor
    bin_counts: Tensor
    line_sums: Tensor
    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, edges: Tensor | Sequence[float], kind: str = "cosine", **kwargs) -> None:
        super().__init__(**kwargs)
        edges = torch.as_tensor(edges, dtype=torch.float64).cpu()
        if edges.dim() != 1 or edges.numel() < 2 or bool((edges[1:] < edges[:-1]).any()):
            raise ValueError(f"`edges` must be a 1-D increasing sequence of at least 2 values, got {edges}.")
        self.kind = check_choice(kind, "kind", KINDS)
        self.register_buffer("edges", edges)
        bins = edges.numel() - 1
        self.add_state("bin_sums", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_counts", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("line_sums", default=torch.zeros(5, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        gram: Tensor,
        distances: Tensor,
        sq_norms: Tensor | None = None,
        sq_norms2: Tensor | None = None,
        indices: Tensor | None = None,
        indices2: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add the pairs of a block [n, m]: its Gram values, distances, norms (cosine), indices and a pair mask."""
        if gram.numel() == 0:
            return
        stiffness = block_stiffness(self.kind, gram, sq_norms, sq_norms2)
        keep = _pair_mask(gram, indices, indices2, mask) & torch.isfinite(stiffness) & torch.isfinite(distances)
        x, y = distances[keep].double(), stiffness[keep].double()
        self.line_sums += line_sum_vector(x, y).to(self.line_sums.device)
        edges = self.edges.to(x.device)
        inside = (x >= edges[0]) & (x <= edges[-1])
        sums, counts = binned_sums(x[inside], y[inside], edges)
        self.bin_sums += sums
        self.bin_counts += counts.double()

    def compute(self) -> tuple[DistanceCurve, float]:
        mean = mean_or_nan(self.bin_sums, self.bin_counts)
        curve = DistanceCurve(edges=self.edges.cpu(), mean=mean.cpu(), count=self.bin_counts.round().long().cpu())
        xi = critical_distance_from_sums(LineFitSums(*[float(v) for v in self.line_sums]))
        return curve, xi

    def _shaped(self, value: tuple[DistanceCurve, float]) -> tuple[DistanceCurve, float]:
        curve, xi = value
        return DistanceCurve(curve.edges.reshape(-1), curve.mean.reshape(-1), curve.count.reshape(-1)), float(xi)


class GradientAlignment(_ShapedMetric):
    r"""Gradient coherence and diversity of one set of examples, accumulated over blocks of rows of its Gram matrix.

    Keeps the sum of all Gram entries :math:`\mathbf{1}^\top G \mathbf{1}`, the trace and the count; ``compute()``
    gives ``(coherence, diversity)`` as :func:`~lightning_stiffness.functional.gradient_coherence` and
    :func:`~lightning_stiffness.functional.gradient_diversity` do on the whole matrix.

    Example::

        >>> import torch
        >>> from lightning_stiffness.measures.metrics import GradientAlignment
        >>> g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> gram, metric = g @ g.T, GradientAlignment()
        >>> for rows in (slice(0, 1), slice(1, 3)):
        ...     metric.update(gram[rows], gram.diagonal()[rows])
        >>> [round(v, 4) for v in metric.compute()]
        [0.6667, 0.5]
    """

    total: Tensor  # states registered by add_state, declared for type checkers
    trace: Tensor
    count: Tensor
    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("total", "trace", "count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rows: Tensor, sq_norms: Tensor) -> None:
        """Add rows [n, N] of the set's Gram matrix (against all N examples of the set) and their diagonal [n]."""
        self.total += rows.double().sum().to(self.total.device)
        self.trace += sq_norms.double().sum().to(self.trace.device)
        self.count += float(sq_norms.numel())

    def compute(self) -> tuple[float, float]:
        total, trace, count = float(self.total), float(self.trace), round(float(self.count))
        return coherence_from_sums(total, trace, count), diversity_from_sums(total, trace)

    def _shaped(self, value: tuple[float, float]) -> tuple[float, float]:
        return float(value[0]), float(value[1])
