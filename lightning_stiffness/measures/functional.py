"""The stiffness measures as pure functions of tensors (Gram matrices, distances, labels), and the sums behind them.

The public namespace :mod:`lightning_stiffness.functional` hands on the functions of ``__all__`` beside the Gram
matrix, class stiffness over a whole dataset and layer outputs; its docstring gives the definitions. The sums
(``class_pair_sums``, ``binned_sums``, ``line_sum_vector``, ...) are what :mod:`~lightning_stiffness.measures.metrics`
accumulates over blocks of a Gram matrix.
"""

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_stiffness.gram.validation import check_choice, check_int
from lightning_stiffness.names import DISTANCE_METRICS

# The sums behind the measures (`class_pair_sums`, `binned_sums`, `line_sum_vector`, ...) are internals that
# `lightning_stiffness.measures.metrics` accumulates over blocks; they are not part of this public list.
__all__ = [
    "DistanceCurve",
    "class_stiffness",
    "cosine_stiffness",
    "critical_distance",
    "distance_bin_edges",
    "gradient_coherence",
    "gradient_diversity",
    "pairwise_distances",
    "sign_stiffness",
    "stiffness_by_distance",
    "within_between",
]


def _check_matrix(value: Tensor, name: str) -> None:
    if not isinstance(value, Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor [N, M], got {shape}.")
    if value.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(value.shape)}.")


def _check_vector(value: Tensor, name: str, length: int, what: str) -> None:
    if not isinstance(value, Tensor) or value.dim() != 1 or value.shape[0] != length:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a 1-D tensor with one entry per {what} ({length}), got {shape}.")


def cosine_stiffness(gram: Tensor, sq_norms: Tensor | None = None, sq_norms2: Tensor | None = None) -> Tensor:
    r"""Cosine stiffness :math:`G_{ij} / \sqrt{|g_i|^2 |g'_j|^2}`, clamped to [-1, 1].

    Args:
        gram: Gram matrix [N, M] of per-example gradients.
        sq_norms: squared gradient norms of the rows, [N]. Default: the diagonal of a square ``gram``.
        sq_norms2: squared gradient norms of the columns, [M]. Default: ``sq_norms`` when ``gram`` is square.

    Returns:
        [N, M] tensor. An example with a zero gradient has no direction: its row or column is NaN (never inf, never
        an exception).

    Raises:
        ValueError: if ``gram`` is not 2-D, or the norms are missing for a cross Gram matrix or have the wrong length.
    """
    _check_matrix(gram, "gram")
    n, m = gram.shape
    if sq_norms is None:
        if n != m:
            raise ValueError(f"`sq_norms` is required for a non-square `gram` ({n} x {m}).")
        sq_norms = torch.diagonal(gram)
    _check_vector(sq_norms, "sq_norms", n, "row of `gram`")
    if sq_norms2 is None:
        if n != m:
            raise ValueError(f"`sq_norms2` is required for a non-square `gram` ({n} x {m}).")
        sq_norms2 = sq_norms
    _check_vector(sq_norms2, "sq_norms2", m, "column of `gram`")
    denom = torch.sqrt(sq_norms.clamp_min(0)[:, None] * sq_norms2.clamp_min(0)[None, :])
    cos = torch.where(denom > 0, gram / denom, torch.full_like(gram, float("nan")))
    return cos.clamp(-1.0, 1.0)


def sign_stiffness(gram: Tensor) -> Tensor:
    r"""Sign stiffness :math:`\operatorname{sign}(G_{ij})` as a floating tensor (-1, 0 or 1)."""
    _check_matrix(gram, "gram")
    out = torch.sign(gram)
    return out if out.is_floating_point() else out.to(torch.get_default_dtype())


def _check_labels(labels: Tensor, name: str, length: int) -> None:
    _check_vector(labels, name, length, "example")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer class indices, got dtype {labels.dtype}.")


def class_stiffness(
    stiffness: Tensor, labels: Tensor, labels2: Tensor | None = None, num_classes: int | None = None
) -> Tensor:
    r"""Class stiffness matrix: :math:`C_{ab}` = mean stiffness over pairs (i in class a, j in class b).

    With a single set (``labels2`` is None, square ``stiffness``) the pairs i == j are left out, as in the paper.
    Non-finite entries of ``stiffness`` are left out too.

    Args:
        stiffness: [N, M] stiffness (cosine or sign) between two sets of examples, or within one set.
        labels: class of each row, integers in [0, num_classes).
        labels2: class of each column; None when rows and columns are the same examples.
        num_classes: number of classes C. Default: the largest label plus one.

    Returns:
        [C, C] tensor in the dtype of ``stiffness``; NaN where a class pair has no pairs.

    Raises:
        ValueError: on lengths that do not match ``stiffness``, non-integer labels, or labels outside
            [0, num_classes).
    """
    _check_matrix(stiffness, "stiffness")
    n, m = stiffness.shape
    same_set = labels2 is None
    if same_set and n != m:
        raise ValueError(f"`labels2` is required for a non-square `stiffness` ({n} x {m}).")
    _check_labels(labels, "labels", n)
    labels2 = labels if labels2 is None else labels2
    _check_labels(labels2, "labels2", m)
    highest = int(max(labels.max(), labels2.max()))
    if num_classes is None:
        num_classes = highest + 1
    check_int(num_classes, "num_classes")
    lowest = int(min(labels.min(), labels2.min()))
    if lowest < 0 or highest >= num_classes:
        raise ValueError(f"`labels` and `labels2` must lie in [0, {num_classes}), got values in [{lowest}, {highest}].")

    valid = torch.isfinite(stiffness)
    if same_set:
        valid &= ~torch.eye(n, dtype=torch.bool, device=stiffness.device)
    mean = mean_or_nan(*class_pair_sums(stiffness, valid, labels, labels2, num_classes))
    return mean.to(stiffness.dtype if stiffness.is_floating_point() else torch.get_default_dtype())


def class_pair_sums(
    stiffness: Tensor, valid: Tensor, labels: Tensor, labels2: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Per class pair (a, b): the float64 sum of the ``valid`` stiffness values and their count, both [C, C].

    The sums behind :func:`class_stiffness`; sums of disjoint blocks of pairs add (see
    :class:`lightning_stiffness.measures.metrics.ClassStiffness`).
    """
    values = torch.where(valid, stiffness, torch.zeros_like(stiffness)).double()
    rows = torch.nn.functional.one_hot(labels.long().to(stiffness.device), num_classes).double()
    cols = torch.nn.functional.one_hot(labels2.long().to(stiffness.device), num_classes).double()
    return rows.T @ values @ cols, rows.T @ valid.double() @ cols


def mean_or_nan(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums / counts``, NaN where the count is 0 (a mean over nothing)."""
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))


def within_between(class_matrix: Tensor) -> tuple[float, float]:
    """Within-class and between-class stiffness: NaN-ignoring means of the diagonal and of the off-diagonal.

    Args:
        class_matrix: [C, C] class stiffness matrix (:func:`class_stiffness`).

    Returns:
        ``(within, between)`` as floats; NaN when every entry of that part is NaN (or, for between, when C == 1).
    """
    _check_matrix(class_matrix, "class_matrix")
    if class_matrix.shape[0] != class_matrix.shape[1]:
        raise ValueError(f"`class_matrix` must be square [C, C], got {tuple(class_matrix.shape)}.")
    diagonal = torch.eye(class_matrix.shape[0], dtype=torch.bool, device=class_matrix.device)
    within = torch.nanmean(class_matrix[diagonal].double())
    off = class_matrix[~diagonal].double()
    between = torch.nanmean(off) if off.numel() else torch.tensor(float("nan"))
    return float(within), float(between)


def _flatten_features(value: Tensor, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] == 0:
        raise ValueError(f"`{name}` must be a tensor with at least one example per row, got {value!r:.80}.")
    flat = value.reshape(value.shape[0], -1)
    return flat if flat.is_floating_point() else flat.to(torch.get_default_dtype())


def pairwise_distances(a: Tensor, b: Tensor | None = None, metric: Literal["cosine", "euclidean"] = "cosine") -> Tensor:
    r"""Distances between examples, over their flattened features.

    Args:
        a: [N, ...] features (inputs or a layer's outputs).
        b: [M, ...] features; None for the distances within ``a``.
        metric: ``"cosine"``, :math:`1 - \cos(a_i, b_j)` in [0, 2] (the paper's input distance; NaN for an all-zero
            example, which has no direction), or ``"euclidean"``, :math:`|a_i - b_j|`.

    Returns:
        [N, M] tensor. Within one set the diagonal is exactly 0.

    Raises:
        ValueError: for an unknown ``metric``, empty inputs or feature sizes that differ between ``a`` and ``b``.
    """
    check_choice(metric, "metric", DISTANCE_METRICS)
    x = _flatten_features(a, "a")
    y = x if b is None else _flatten_features(b, "b").to(x.dtype)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`a` and `b` must have the same number of features, got {x.shape[1]} and {y.shape[1]}.")
    if metric == "cosine":
        norms_x, norms_y = x.norm(dim=1), y.norm(dim=1)
        denom = norms_x[:, None] * norms_y[None, :]
        cos = torch.where(denom > 0, (x @ y.T) / denom, torch.full_like(denom, float("nan")))
        dist = 1.0 - cos.clamp(-1.0, 1.0)
    else:
        dist = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    if b is None:
        finite_diag = torch.isfinite(torch.diagonal(dist))
        dist.diagonal().copy_(torch.where(finite_diag, torch.zeros_like(dist.diagonal()), dist.diagonal()))
    return dist


def _pair_values(stiffness: Tensor, distances: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The finite (distance, stiffness) pairs selected by ``mask``, as flat float64 tensors."""
    _check_matrix(stiffness, "stiffness")
    if not isinstance(distances, Tensor) or distances.shape != stiffness.shape:
        shape = tuple(distances.shape) if isinstance(distances, Tensor) else type(distances).__name__
        raise ValueError(f"`distances` must have the shape of `stiffness` {tuple(stiffness.shape)}, got {shape}.")
    if mask is None:
        n, m = stiffness.shape
        mask = torch.ones(n, m, dtype=torch.bool, device=stiffness.device)
        if n == m:
            mask &= ~torch.eye(n, dtype=torch.bool, device=stiffness.device)
    elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != stiffness.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"`mask` must be a boolean tensor of shape {tuple(stiffness.shape)}, got {shape}.")
    keep = mask & torch.isfinite(stiffness) & torch.isfinite(distances)
    return distances[keep].double(), stiffness[keep].double()


class DistanceCurve(NamedTuple):
    """Mean stiffness in bins of distance: ``edges`` [B + 1], ``mean`` [B] (NaN for empty bins), ``count`` [B]."""

    edges: Tensor
    mean: Tensor
    count: Tensor  # type: ignore[assignment]  # the field shadows tuple.count, as users have read it since 0.1


def _bin_edges(values: Tensor, bins: int, binning: str) -> Tensor:
    if values.numel() == 0:
        return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    low, high = values.min(), values.max()
    if binning == "quantile":
        ordered = values.sort().values
        # Linear interpolation between order statistics, as torch.quantile does (which refuses large inputs).
        positions = torch.linspace(0, ordered.numel() - 1, bins + 1, dtype=torch.float64)
        below = positions.floor().long()
        above = positions.ceil().long()
        edges = ordered[below] + (positions - below) * (ordered[above] - ordered[below])
    else:
        edges = torch.linspace(float(low), float(high), bins + 1, dtype=torch.float64)
    if float(high) == float(low):
        edges = torch.linspace(float(low) - 0.5, float(high) + 0.5, bins + 1, dtype=torch.float64)
    return edges


def distance_bin_edges(
    distances: Tensor, mask: Tensor | None = None, bins: int = 20, binning: Literal["width", "quantile"] = "width"
) -> Tensor:
    """Bin edges [bins + 1] (float64) over the finite distances selected by ``mask`` (default: all).

    ``"width"``: equal-width bins between the smallest and largest distance; ``"quantile"``: bins holding about the
    same number of pairs. Used to bin several sets of pairs (within and between classes) on the same edges.
    """
    if binning not in ("width", "quantile"):
        raise ValueError(f"`binning` must be 'width' or 'quantile', got {binning!r}.")
    check_int(bins, "bins")
    keep = torch.isfinite(distances) if mask is None else torch.isfinite(distances) & mask
    return _bin_edges(distances[keep].double().cpu(), bins, binning)


def stiffness_by_distance(
    stiffness: Tensor,
    distances: Tensor,
    mask: Tensor | None = None,
    bins: int | Tensor = 20,
    binning: Literal["width", "quantile"] = "width",
) -> DistanceCurve:
    """Mean stiffness against distance, in bins.

    Args:
        stiffness: [N, M] stiffness between examples.
        distances: [N, M] distances between the same examples (:func:`pairwise_distances`).
        mask: boolean [N, M] selecting the pairs to use (for example, same-class pairs). Default: every pair, minus
            the diagonal when the matrices are square (a set against itself). Non-finite pairs are always left out.
        bins: number of bins, or a 1-D tensor of increasing bin edges (pairs outside them are left out).
        binning: ``"width"`` for equal-width bins between the smallest and largest distance, ``"quantile"`` for bins
            holding about the same number of pairs. Ignored when ``bins`` is a tensor of edges.

    Returns:
        :class:`DistanceCurve` (float64): bin edges, mean stiffness per bin (NaN where a bin is empty), pair counts.
        Bins are half-open ``[e_k, e_k+1)`` except the last, which includes its right edge.

    Raises:
        ValueError: on shapes that do not match, a bad ``mask``, ``bins`` < 1 or edges that are not increasing, or an
            unknown ``binning``.
    """
    if binning not in ("width", "quantile"):
        raise ValueError(f"`binning` must be 'width' or 'quantile', got {binning!r}.")
    dist, stiff = _pair_values(stiffness, distances, mask)
    if isinstance(bins, Tensor):
        edges = bins.double().cpu()
        if edges.dim() != 1 or edges.numel() < 2 or bool((edges[1:] < edges[:-1]).any()):
            raise ValueError(f"`bins` given as edges must be a 1-D increasing tensor of at least 2 values, got {bins}.")
        inside = (dist >= edges[0]) & (dist <= edges[-1])
        dist, stiff = dist[inside], stiff[inside]
    else:
        check_int(bins, "bins", alternative="or a tensor of edges")
        edges = _bin_edges(dist.cpu(), bins, binning)
    sums, count = binned_sums(dist.cpu(), stiff.cpu(), edges)
    return DistanceCurve(edges=edges, mean=mean_or_nan(sums, count), count=count)


def binned_sums(distances: Tensor, stiffness: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Per bin of ``edges``: the float64 sum of the stiffness values whose distance falls in it, and their count.

    ``distances`` and ``stiffness`` are flat, of pairs already inside the edges; bins are ``[e_k, e_k+1)`` except the
    last, which includes its right edge.
    """
    num_bins = edges.numel() - 1
    edges = edges.to(distances.device)
    index = torch.bucketize(distances, edges[1:-1], right=True).clamp_max(num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64, device=distances.device).index_add_(0, index, stiffness.double())
    count = torch.zeros(num_bins, dtype=torch.long, device=distances.device).index_add_(
        0, index, torch.ones_like(index)
    )
    return sums, count


class LineFitSums(NamedTuple):
    """The sums a least-squares line needs: n, sum x, sum y, sum x^2, sum x*y (x: distance, y: stiffness).

    Sums from disjoint sets of pairs add, which lets a metric accumulate them block by block.
    """

    n: float
    sum_x: float
    sum_y: float
    sum_xx: float
    sum_xy: float


def line_fit_sums(stiffness: Tensor, distances: Tensor, mask: Tensor | None = None) -> LineFitSums:
    """The :class:`LineFitSums` of the finite pairs selected by ``mask`` (default as in :func:`critical_distance`)."""
    return LineFitSums(*line_sum_vector(*_pair_values(stiffness, distances, mask)).tolist())


def line_sum_vector(distances: Tensor, stiffness: Tensor) -> Tensor:
    """The :class:`LineFitSums` of flat (distance, stiffness) pairs as a float64 tensor [5], on their device."""
    x, y = distances.double(), stiffness.double()
    count = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([count, x.sum(), y.sum(), (x * x).sum(), (x * y).sum()])


def critical_distance_from_sums(sums: LineFitSums) -> float:
    """Zero crossing -a / b of the least-squares line y = a + b x with these sums; NaN unless b < 0."""
    n, sx, sy, sxx, sxy = sums
    if n < 2:
        return float("nan")
    spread = n * sxx - sx * sx
    # A relative threshold: all distances equal (up to rounding) leaves the slope undefined.
    if spread <= 1e-12 * max(n * sxx, 1e-300):
        return float("nan")
    slope = (n * sxy - sx * sy) / spread
    if not slope < 0:
        return float("nan")
    intercept = (sy - slope * sx) / n
    return -intercept / slope


def critical_distance(stiffness: Tensor, distances: Tensor, mask: Tensor | None = None) -> float:
    r"""Stiff-domain size :math:`\xi` (Fort et al.): where the least-squares line of stiffness on distance crosses 0.

    Fits ``stiffness = a + b * distance`` over the selected finite pairs and returns :math:`-a / b`.

    Args:
        stiffness: [N, M] stiffness between examples.
        distances: [N, M] distances between the same examples.
        mask: boolean [N, M] selecting the pairs (the paper uses same-class pairs). Default: every pair, minus the
            diagonal when the matrices are square.

    Returns:
        :math:`\xi` as a float; NaN when the fitted line does not decrease (b >= 0), or there are fewer than two
        distinct distances. A negative value means the line is already below zero at distance 0.

    Raises:
        ValueError: on shapes that do not match or a bad ``mask``.
    """
    return critical_distance_from_sums(line_fit_sums(stiffness, distances, mask))


def gradient_coherence(gram: Tensor) -> float:
    r"""Gradient coherence of a set of examples (Chatterjee and Zielinski, "Making Coherence Out of Nothing At All:
    Measuring the Evolution of Gradient Alignment", arXiv 2008.01217): the squared norm of the mean gradient over the
    mean squared gradient norm.

    .. math::
        \alpha = \frac{\mathbb{E}_{i, j}[g_i \cdot g_j]}{\mathbb{E}_i[g_i \cdot g_i]}
               = \frac{|\frac{1}{N} \sum_i g_i|^2}{\frac{1}{N} \sum_i |g_i|^2}
               = \frac{\mathbf{1}^\top G \mathbf{1}}{N \operatorname{tr} G}

    with :math:`i` and :math:`j` drawn independently and uniformly from the set (so :math:`i = j` counts, as in the
    paper). :math:`\alpha` lies in [0, 1]: 1 when all gradients are equal, :math:`\alpha_\perp = 1/N` when they are
    pairwise orthogonal, 0 when they sum to zero. The paper's *m-coherence* is :math:`\alpha / \alpha_\perp = N
    \alpha`, about how many examples of the set a small step along one example's gradient helps, which is
    :math:`1 / \Delta` (:func:`gradient_diversity`).

    Args:
        gram: [N, N] Gram matrix of the set's per-example gradients (N >= 2).

    Returns:
        :math:`\alpha` as a float; NaN when every gradient is zero.

    Raises:
        ValueError: if ``gram`` is not square or has fewer than 2 rows.
    """
    total, trace, n = _square_sums(gram)
    return coherence_from_sums(total, trace, n)


def gradient_diversity(gram: Tensor) -> float:
    r"""Gradient diversity of a set of examples (Yin, Pananjady, Lam, Papailiopoulos, Ramchandran and Bartlett,
    "Gradient Diversity: a Key Ingredient for Scalable Distributed Learning", AISTATS 2018, arXiv 1706.05699,
    Definition 1).

    .. math::
        \Delta = \frac{\sum_i |g_i|^2}{|\sum_i g_i|^2} = \frac{\operatorname{tr} G}{\mathbf{1}^\top G \mathbf{1}}

    At least 1/N (all gradients equal); large when the gradients cancel. Yin et al.'s batch-size bound is
    :math:`N \Delta`: mini-batch SGD with batches up to about that size converges, per example seen, about as fast
    as one-example SGD. Related to :func:`gradient_coherence` by :math:`1/\Delta = N \alpha` (the m-coherence).

    Args:
        gram: [N, N] Gram matrix of the set's per-example gradients.

    Returns:
        :math:`\Delta` as a float; inf when the gradients sum to zero, NaN when they are all zero.

    Raises:
        ValueError: if ``gram`` is not square or has fewer than 2 rows.
    """
    total, trace, _ = _square_sums(gram)
    return diversity_from_sums(total, trace)


def _square_sums(gram: Tensor) -> tuple[float, float, int]:
    _check_matrix(gram, "gram")
    if gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"`gram` must be a square Gram matrix of at least 2 examples, got {tuple(gram.shape)}.")
    values = gram.double()
    return float(values.sum()), float(values.diagonal().sum()), gram.shape[0]


def coherence_from_sums(total: float, trace: float, n: int) -> float:
    """:func:`gradient_coherence` from the sum of all Gram entries, the trace and N."""
    if not trace > 0 or n < 1:
        return float("nan")
    return total / (n * trace)


def diversity_from_sums(total: float, trace: float) -> float:
    """:func:`gradient_diversity` from the sum of all Gram entries and the trace."""
    if not trace > 0:
        return float("nan")
    return trace / total if total > 0 else float("inf")
