r"""Bootstrap intervals for a probe's numbers, from the stiffness matrices already in hand (no new gradients).

A probe measures a few examples a class; its within/between-class stiffness and critical distances are estimates of
the same numbers over the whole data the examples were drawn from. Each bootstrap draw resamples the probe examples
with replacement *within their classes* (multinomial weights :math:`w_i`: how often example :math:`i` is drawn, the
class sizes kept), and recomputes each number from weighted pair sums,

.. math::
    C^{*}_{ab} = \frac{\sum_{i \in a, j \in b, i \neq j} w_i w'_j s_{ij}}{\sum_{i \in a, j \in b, i \neq j} w_i w'_j},

(and the five sums of the least-squares line behind :math:`\xi`, weighted the same way), so a draw costs a few
products of the weights with the stored [N, M] matrices instead of any gradient. Pairs of an example with itself (or
with its own copies) stay out, as in the probe. The interval is the percentile interval
(Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13): the 2.5% and 97.5% quantiles of the
draws. The train and val sets are resampled independently, once per draw for all pairs and kinds.

A draw whose line through the same-class (distance, stiffness) pairs does not fall has no finite :math:`\xi`; it
counts as :math:`+\infty` (the stiff domain did not end), so an upper end of ``inf`` says that more than 2.5% of the
draws found no crossing.

The distance curves get a band (:func:`curve_bands`, a result's ``curve_intervals``) from the same draws
(:func:`draw_weights`, made once per probe): in each distance bin, the percentile interval of the draws' weighted bin
means :math:`\sum w_i w'_j s_{ij} / \sum w_i w'_j` over the bin's pairs, same-class pairs for the ``within`` curve
and the others for ``between``, exactly the curve's pairs (its stiffness kind, finite values, no self-pairs). A draw
that puts no weight in a bin has no mean there and is left out of that bin's percentiles; a bin empty in the probe
has NaN ends. A pair lies in one (side, bin) slot, so a chunk of draws costs one sparse product of a matrix with a
row per (example, slot) with the column weights, and a weighted sum over its rows.
"""

import math
import warnings

import torch
from torch import Tensor

from lightning_stiffness.names import (
    PAIRS,
    PREFIX,
    SIDES,
    class_tag,
    critical_distance_tag,
    kind_key,
)

#: Coverage of the intervals.
LEVEL = 0.95


def bootstrap_weights(labels: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """Multinomial resampling weights [num_draws, N]: per draw, each class's n_c examples drawn n_c times with
    replacement among themselves (so every row sums to N and each class keeps its size)."""
    labels = labels.cpu()
    weights = torch.zeros(num_draws, labels.numel())
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        picks = torch.randint(0, members.numel(), (num_draws, members.numel()), generator=generator)
        weights[:, members] = weights[:, members].scatter_add(1, picks, torch.ones(picks.shape))
    return weights


def weighted_class_sums(
    forms: Tensor, w_rows: Tensor, w_cols: Tensor, labels_r: Tensor, labels_c: Tensor, num_classes: int
) -> Tensor:
    """Per draw and class pair (a, b), :math:`\\sum_{i \\in a, j \\in b} w_i F_{ij} w'_j` for each form F.

    Args:
        forms: [K, N, M] pair values (already zero where a pair is left out).
        w_rows, w_cols: [B, N] and [B, M] weights of the draws.
        labels_r, labels_c: [N] and [M] classes.
        num_classes: C.

    Returns:
        [K, B, C, C] sums (float32: the weights are small integers and the values bounded).
    """
    k, b = forms.shape[0], w_rows.shape[0]
    out = torch.zeros(k, num_classes, b, num_classes)
    rows_onehot_t = torch.nn.functional.one_hot(labels_r.long(), num_classes).float().T  # [C, N]
    weights_t = w_rows.T.contiguous()  # [N, B]
    for label, cols in _class_spans(labels_c):
        per_row = forms[:, :, cols] @ w_cols[:, cols].T  # [K, N, B]: sum over j in class `label`
        out[:, :, :, label] = rows_onehot_t @ (per_row * weights_t)  # [K, C, B]: sum over i by class
    return out.transpose(1, 2)


def _class_spans(labels: Tensor) -> list[tuple[int, Tensor | slice]]:
    """Each class and its examples: a slice when they are contiguous (sorted labels: views, no copies)."""
    spans = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        first, last = int(members[0]), int(members[-1])
        contiguous = last - first + 1 == members.numel()
        spans.append((label, slice(first, last + 1) if contiguous else members))
    return spans


def percentile_interval(draws: Tensor) -> tuple[float, float]:
    """The central :data:`LEVEL` percentile interval of ``draws`` [B] (NaN draws left out; all NaN: NaN, NaN)."""
    kept = draws[~torch.isnan(draws)].double()
    if kept.numel() == 0:
        return float("nan"), float("nan")
    tail = (1 - LEVEL) / 2
    # The outer order statistics (no interpolation, which an infinite xi would turn into NaN).
    low = torch.quantile(kept, tail, interpolation="lower")
    high = torch.quantile(kept, 1 - tail, interpolation="higher")
    return float(low), float(high)


def _within_between_draws(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Within- and between-class means of each draw's class matrix ([B, C, C] sums and counts) -> [B], [B]."""
    matrix = torch.where(counts > 0, sums / counts.clamp_min(1e-12), torch.full_like(sums, float("nan")))
    diagonal = torch.eye(matrix.shape[-1], dtype=torch.bool)
    return matrix[:, diagonal].nanmean(dim=1), matrix[:, ~diagonal].nanmean(dim=1)


def xi_draws(sums: Tensor) -> Tensor:
    """Critical distance of each draw from its line sums [5, B] (n, sum x, sum y, sum x^2, sum xy); +inf where the
    fitted line does not fall, NaN where it is undefined (fewer than two distinct distances)."""
    n, sx, sy, sxx, sxy = sums.double()
    spread = n * sxx - sx * sx
    defined = (n >= 2) & (spread > 1e-12 * (n * sxx).clamp_min(1e-300))
    slope = (n * sxy - sx * sy) / torch.where(defined, spread, torch.ones_like(spread))
    intercept = (sy - slope * sx) / n.clamp_min(1)
    xi = torch.where(slope < 0, -intercept / torch.where(slope < 0, slope, -torch.ones_like(slope)), torch.inf)
    return torch.where(defined, xi, torch.full_like(xi, float("nan")))


def _same_class_line_sums(
    stiffness: Tensor, distances: Tensor, valid: Tensor, w_rows: Tensor, w_cols: Tensor, labels_r, labels_c
) -> Tensor:
    """The five weighted line sums [5, B] over same-class valid pairs, class block by class block."""
    x = torch.where(valid, distances, torch.zeros_like(distances)).float()
    y = torch.where(valid, stiffness, torch.zeros_like(stiffness)).float()
    forms = torch.stack([valid.float(), x, y, x * x, x * y])
    out = torch.zeros(5, w_rows.shape[0], dtype=torch.float64)
    cols_of = dict(_class_spans(labels_c))
    for label, rows in _class_spans(labels_r):
        if label not in cols_of:
            continue
        cols = cols_of[label]
        per_row = forms[:, rows][:, :, cols] @ w_cols[:, cols].T  # [5, n_a, B]
        out += (per_row * w_rows[:, rows].T).sum(dim=1).double()
    return out


def bootstrap_intervals(
    stiffness: dict[str, Tensor],
    distances: dict[str, Tensor],
    labels: dict[str, Tensor],
    kinds: tuple[str, ...],
    xi_kind: str,
    num_classes: int,
    num_draws: int,
    generator: torch.Generator | None,
    prefix: str = PREFIX,
    weights: dict[str, Tensor] | None = None,
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of within/between-class stiffness (each pair and kind) and of each critical distance.

    Args:
        stiffness: ``"{pair}/{kind}"`` -> [N, M] stiffness matrix (as in :class:`~lightning_stiffness.measure.
            StiffnessResult`).
        distances: ``pair`` (input space) or ``"{pair}/{layer}"`` (a layer's representation) -> [N, M] distances;
            one critical distance interval each, fitted on ``xi_kind`` stiffness over same-class pairs.
        labels: probe set -> [n] labels.
        kinds, xi_kind, num_classes: as in the result.
        num_draws: bootstrap draws B (at least 2).
        generator: the source of the draws (the same draws for the same seed, on every process).
        prefix: the tags' first part.
        weights: the draws already made (:func:`draw_weights`, ``num_draws`` each), to share them with
            :func:`curve_bands`; default: drawn here from ``generator``.

    Returns:
        Scalar tag (as logged) -> ``(low, high)``.
    """
    if weights is None:
        weights = draw_weights(labels, num_draws, generator)
    # Examples ordered by class (the same draws, permuted), so that each class's block is a slice.
    order = {name: torch.argsort(y.cpu(), stable=True) for name, y in labels.items()}
    out: dict[str, tuple[float, float]] = {}
    for pair, (rows, cols) in PAIRS.items():
        if rows not in labels or cols not in labels:
            continue
        o_r, o_c = order[rows], order[cols]
        labels_r, labels_c = labels[rows].cpu()[o_r], labels[cols].cpu()[o_c]
        w_r, w_c = weights[rows][:, o_r], weights[cols][:, o_c]
        not_self = _not_self(labels_r.numel(), labels_c.numel(), rows == cols)
        forms = []
        for kind in kinds:
            values = stiffness[kind_key(pair, kind)].cpu()[o_r][:, o_c]
            valid = torch.isfinite(values) & not_self
            forms += [torch.where(valid, values, torch.zeros_like(values)).float(), valid.float()]
        sums = weighted_class_sums(torch.stack(forms), w_r, w_c, labels_r, labels_c, num_classes)
        for index, kind in enumerate(kinds):
            draws = _within_between_draws(sums[2 * index], sums[2 * index + 1])
            for side, side_draws in zip(SIDES, draws, strict=True):
                out[class_tag(pair, kind, side, prefix)] = percentile_interval(side_draws)
        values = stiffness[kind_key(pair, xi_kind)].cpu()[o_r][:, o_c]
        for key, space in distances.items():
            owner, _, layer = key.partition("/")
            if owner != pair:
                continue
            space = space.cpu()[o_r][:, o_c]
            valid = torch.isfinite(values) & torch.isfinite(space) & not_self
            line = _same_class_line_sums(values, space, valid, w_r, w_c, labels_r, labels_c)
            out[critical_distance_tag(pair, layer or None, prefix)] = percentile_interval(xi_draws(line))
    return out


#: Memory for the products of one chunk of draws in :func:`curve_bands`: the draws go in chunks whose products stay
#: in cache (and below the size the C allocator maps afresh, page by page, on each call).
BAND_CHUNK_BYTES = 5 * 2**20


def draw_weights(labels: dict[str, Tensor], num_draws: int, generator: torch.Generator) -> dict[str, Tensor]:
    """One probe's draws: each probe set's weights [num_draws, n] (:func:`bootstrap_weights`), drawn in the order of
    ``labels``. Given to :func:`bootstrap_intervals` and :func:`curve_bands`, they resample the same examples."""
    return {name: bootstrap_weights(y, num_draws, generator) for name, y in labels.items()}


def curve_bands(
    stiffness: dict[str, Tensor],
    distances: dict[str, Tensor],
    edges: dict[str, Tensor],
    labels: dict[str, Tensor],
    xi_kind: str,
    weights: dict[str, Tensor],
) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """95% percentile bands around each distance curve: in each bin, the interval of the draws' bin means.

    Args:
        stiffness: ``"{pair}/{kind}"`` -> [N, M] stiffness matrix (the curves are of ``xi_kind``).
        distances: ``pair`` (input space) or ``"{pair}/{layer}"`` -> [N, M] distances, one curve each.
        edges: the same keys -> the curve's bin edges (``curves[key]["within"].edges``).
        labels: probe set -> [n] labels.
        xi_kind: the kind of stiffness the curves show.
        weights: probe set -> [B, n] weights of the draws (:func:`draw_weights`).

    Returns:
        Curve key -> ``{"within": (low, high), "between": (low, high)}``, float64 CPU tensors [bins]: NaN ends where
        no draw has a pair in the bin (a bin empty in the probe).
    """
    out = {}
    for key, space in distances.items():
        pair = key.partition("/")[0]
        rows, cols = PAIRS[pair]
        values = stiffness[kind_key(pair, xi_kind)]
        draws = bin_mean_draws(
            values, space, edges[key], labels[rows], labels[cols], weights[rows], weights[cols], rows == cols
        )
        low, high = _percentile_bounds(draws)  # [2, bins] each
        out[key] = {side: (low[index], high[index]) for index, side in enumerate(SIDES)}
    return out


def bin_mean_draws(
    values: Tensor,
    distances: Tensor,
    edges: Tensor,
    labels_r: Tensor,
    labels_c: Tensor,
    w_rows: Tensor,
    w_cols: Tensor,
    same_set: bool,
) -> Tensor:
    r"""Each draw's mean stiffness per side and distance bin, :math:`\sum w_i w'_j s_{ij} / \sum w_i w'_j` over the
    pairs in the bin: [B, 2, bins] float64 (side 0: same class, 1: different classes; NaN where a draw puts no
    weight in a bin).

    The pairs are the probe curve's: finite stiffness, distance inside the edges, no pair of an example with itself
    within a set. Each pair lies in one (side, bin) slot, so the sums are one sparse product per chunk of draws: a
    matrix with a row per (example i, slot) and the pair values at columns j, times the chunk's column weights, then
    rows summed with the row weights. Within a set, the two orders of a pair (same weights, and the same slot but for
    rounding) are one entry :math:`s_{ij} + s_{ji}` counted twice.
    """
    num_bins = edges.numel() - 1
    keep, slot = _pair_slots(values, distances, edges, labels_r, labels_c, same_set)
    values = torch.where(keep, values.cpu(), torch.zeros((), dtype=values.dtype)).float()
    counts = None
    if same_set:
        keep, values, counts = _merged_orders(keep, slot, values)
    matrix = _slot_matrix(keep, slot, values, counts, 2 * num_bins)
    num, den = _weighted_slot_sums(matrix, w_rows.cpu().float(), w_cols.cpu().float(), 2 * num_bins).double()
    means = num.div_(den).masked_fill_(den == 0, float("nan"))
    return means.view(-1, 2, num_bins)


def _pair_slots(
    values: Tensor, distances: Tensor, edges: Tensor, labels_r: Tensor, labels_c: Tensor, same_set: bool
) -> tuple[Tensor, Tensor]:
    """The pairs of the curve ([N, M] bool) and each pair's slot, side * bins + bin ([N, M] int32)."""
    edges = edges.double().cpu()
    distances = distances.cpu().double()
    keep = torch.isfinite(values.cpu()) & (distances >= edges[0]) & (distances <= edges[-1])
    if same_set:
        keep.fill_diagonal_(False)
    slot = _bin_index(distances, edges)
    slot += (labels_r.cpu()[:, None] != labels_c.cpu()[None, :]).int().mul_(edges.numel() - 1)
    return keep, slot


def _bin_index(distances: Tensor, edges: Tensor) -> Tensor:
    """Bin of each float64 distance as :func:`~lightning_stiffness.functional.binned_sums` finds it (``[e_k,
    e_k+1)``, the last bin closed), int32, clamped into the bins. With equal-width edges (the curves') by arithmetic,
    and by the edges themselves where a distance lies near one."""
    num_bins = edges.numel() - 1
    low, width = float(edges[0]), float(edges[-1] - edges[0]) / num_bins
    steps = low + width * torch.arange(num_bins + 1, dtype=torch.float64)
    if not (width > 0 and bool(((edges - steps).abs() <= 1e-9 * width).all())):
        return torch.bucketize(distances, edges[1:-1], right=True, out_int32=True).clamp_max_(num_bins - 1)
    position = (distances - low).div_(width)
    index = position.floor()
    near = position.sub_(index).sub_(0.5).abs_() > 0.5 - 1e-6  # within 1e-6 bin widths of an edge (or NaN: no)
    index = index.clamp_(0, num_bins - 1).int()
    if bool(near.any()):
        index[near] = torch.bucketize(distances[near], edges[1:-1], right=True, out_int32=True).clamp_max_(num_bins - 1)
    return index


def _merged_orders(keep: Tensor, slot: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Within a set (the same weights on both sides): pair (i, j), i < j, also holds (j, i) where both are kept and
    in the same slot; the kept pairs, their values and counts (1 or 2)."""
    upper = torch.ones_like(keep).triu_(1)
    merged = keep & keep.T & (slot == slot.T) & upper
    keep = keep & (upper | ~merged.T)
    values = torch.where(merged, values + values.T, values)
    return keep, values, merged.float().add_(1)


def _slot_matrix(keep: Tensor, slot: Tensor, values: Tensor, counts: Tensor | None, slots: int) -> Tensor:
    """Sparse CSR [2 N slots, M]: row (i, k) holds the values of the kept pairs (i, j) in slot k at columns j; the
    next N slots rows hold their counts."""
    n, m = keep.shape
    num_rows = n * slots
    key = torch.arange(0, num_rows, slots, dtype=torch.int32)[:, None] + slot
    key = key.masked_fill_(~keep, num_rows).flatten()  # pairs left out sort last
    key, order = torch.sort(key)
    nnz = int(keep.sum())
    key, order = key[:nnz], order[:nnz]
    crow = torch.zeros(2 * num_rows + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(key, minlength=num_rows).repeat(2), 0, out=crow[1:])
    kept_counts = torch.ones(nnz) if counts is None else counts.flatten()[order]
    entries = torch.cat([values.flatten()[order], kept_counts])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, (order % m).repeat(2), entries, (2 * num_rows, m), check_invariants=False)


def _weighted_slot_sums(matrix: Tensor, w_rows: Tensor, w_cols: Tensor, slots: int) -> Tensor:
    """Per draw and slot, the weighted sums of the values and of the counts: [2, B, slots] (float32)."""
    num_draws, n = w_rows.shape
    out = torch.empty(2, num_draws, slots)
    chunk = max(1, min(num_draws, BAND_CHUNK_BYTES // (2 * n * slots * 4)))
    for start in range(0, num_draws, chunk):
        stop = min(num_draws, start + chunk)
        per_row = matrix @ w_cols[start:stop].T.contiguous()  # [2 N slots, c]: sums over j by (i, slot)
        per_row = per_row.view(2, n, slots, stop - start).mul_(w_rows[start:stop].T.contiguous()[None, :, None])
        out[:, start:stop] = per_row.sum(dim=1).transpose(1, 2)
    return out


def _percentile_bounds(draws: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`percentile_interval` of ``draws`` [B, ...] along the draws, for every other index at once."""
    tail = (1 - LEVEL) / 2
    draws = draws.double()
    low = torch.nanquantile(draws, tail, dim=0, interpolation="lower")
    high = torch.nanquantile(draws, 1 - tail, dim=0, interpolation="higher")
    return low, high


def _not_self(n: int, m: int, same_set: bool) -> Tensor:
    if same_set:
        return ~torch.eye(n, m, dtype=torch.bool)
    return torch.ones(n, m, dtype=torch.bool)


__all__ = [
    "LEVEL",
    "bin_mean_draws",
    "bootstrap_intervals",
    "bootstrap_weights",
    "curve_bands",
    "draw_weights",
    "interval_series",
    "percentile_interval",
    "weighted_class_sums",
    "xi_draws",
]


def interval_series(results: list, tag_suffix: str) -> tuple[list[float], list[float]]:
    """Lower and upper ends of one scalar's interval across probes (``results``: their ``intervals`` dicts' owners),
    found by the tag without its prefix (``class_tag(pair, kind, side, prefix="")``); NaN where a probe has none,
    and where an end is infinite (so that a band drawn through them leaves a gap there)."""
    lows, highs = [], []
    for result in results:
        found = next((v for k, v in result.intervals.items() if k.endswith(tag_suffix)), (math.nan, math.nan))
        lows.append(found[0] if math.isfinite(found[0]) else math.nan)
        highs.append(found[1] if math.isfinite(found[1]) else math.nan)
    return lows, highs
