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

import functools
import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from lightning_stiffness.names import MODEL, PAIRS, SIDES

if TYPE_CHECKING:
    from lightning_stiffness.measures.result import StiffnessResult

#: Coverage of the intervals.
LEVEL = 0.95

#: Memory for the products of one chunk of draws in :func:`curve_bands`: the draws go in chunks whose products stay
#: in cache (and below the size the C allocator maps afresh, page by page, on each call).
BAND_CHUNK_BYTES = 5 * 2**20

#: Memory for the class matrices of one chunk of draws, where a within/between draw needs its whole class matrix
#: (left-out pairs other than whole rows and columns): the draws go in chunks whose [C, C] sums and counts and
#: [N, C] column sums stay under it, whatever C.
CLASS_CHUNK_BYTES = 256 * 2**20


def bootstrap_weights(labels: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """Multinomial resampling weights [num_draws, N]: per draw, each class's n_c examples drawn n_c times with
    replacement among themselves (so every row sums to N and each class keeps its size)."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)  # each class's examples in ascending order, classes ascending
    drawn, start = [], 0
    for size in torch.unique(labels, return_counts=True)[1].tolist():
        picks = torch.randint(0, size, (num_draws, size), generator=generator)  # one class, as it always drew
        drawn.append(order[start : start + size][picks])
        start += size
    weights = torch.zeros(num_draws, labels.numel())
    if drawn:
        index = torch.cat(drawn, dim=1)
        weights.scatter_add_(1, index, torch.ones(index.shape))
    return weights


def draw_weights(labels: dict[str, Tensor], num_draws: int, generator: torch.Generator) -> dict[str, Tensor]:
    """One probe's draws: each probe set's weights [num_draws, n] (:func:`bootstrap_weights`), drawn in the order of
    ``labels``. Given to :func:`bootstrap_intervals` and :func:`curve_bands`, they resample the same examples."""
    return {name: bootstrap_weights(y, num_draws, generator) for name, y in labels.items()}


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
        [K, B, C, C] sums (float32: the weights are small integers and the values bounded), computed in float64.
    """
    w_rows, w_cols = w_rows.double(), w_cols.double()
    draws, members_r = torch.arange(w_rows.shape[0]), _Members.of(labels_r, num_classes)
    sums = [_chunk_class_sums(form.double(), w_rows, w_cols, members_r, labels_c, num_classes, draws) for form in forms]
    return torch.stack(sums).permute(0, 3, 1, 2).float()


def _chunk_class_sums(
    form: Tensor,
    w_rows: Tensor,
    w_cols: Tensor,
    members_r: "_Members",
    labels_c: Tensor,
    num_classes: int,
    draws: Tensor,
) -> Tensor:
    """The class sums [C, C, k] of one float64 form for the draws ``draws`` (k of them): the column sums by class
    for all k draws at once, a product with a sparse [M, C k] matrix holding each column's k weights, then the rows
    added by class, each weighted by its draw. O(k (N M + N C)), no [C, C] product per class."""
    n, m = form.shape
    k = draws.numel()
    crow = torch.arange(0, m * k + 1, k)  # row j: its k weights, at columns y_j k + t (ascending)
    cols = (labels_c.long()[:, None] * k + torch.arange(k)[None, :]).flatten()
    values = w_cols[draws].T.contiguous().flatten()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        spread = torch.sparse_csr_tensor(crow, cols, values, (m, num_classes * k), check_invariants=False)
        by_column_class = (form @ spread).view(n, num_classes, k)  # [N, C, k]: sum over j in class c
    by_column_class.mul_(w_rows[draws].T[:, None, :])
    return members_r.sums(by_column_class)  # rows added by class: [C, C, k]


def _class_draws(
    stiffness: dict[str, Tensor],
    pair: str,
    kinds: tuple[str, ...],
    labels_r: Tensor,
    labels_c: Tensor,
    w_r: Tensor,
    w_c: Tensor,
    num_classes: int,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each kind's within- and between-class draws [B] for one pair (``stiffness``: kind -> its [N, M] matrix).

    A draw's within (between) is the NaN-ignoring mean of its class matrix's diagonal (off-diagonal) entries, each
    :math:`S_{ab} / N_{ab}`: weighted pair sum over weighted pair count, NaN where the count is 0. When the pairs left
    out (non-finite, self-pairs) are whole rows and columns (a zero gradient) or none, the counts are products of the
    classes' kept weights :math:`U_a V_b` (less the self-pairs on the diagonal), so the between mean is one bilinear
    form per draw, :math:`\\sum_{y_i \\neq y_j} \\tilde w_i s_{ij} \\tilde w'_j / P` with
    :math:`\\tilde w_i = w_i / U_{y_i}` and :math:`P` the number of class pairs with a count, and the within sums
    need only the same-class pairs: O(B N M) in all, no [C, C] matrix per draw. Other patterns of left-out pairs take
    the class matrices in chunks of draws (:data:`CLASS_CHUNK_BYTES`)."""
    rows, cols = PAIRS[pair]
    same_set = rows == cols
    labels_r, labels_c = labels_r.long(), labels_c.long()
    w_r, w_c = w_r.double(), w_c.double()
    same_class = torch.nonzero(labels_r[:, None] == labels_c[None, :]).T  # [2, P], row-major
    members_r, members_c = _Members.of(labels_r, num_classes), _Members.of(labels_c, num_classes)
    out = {}
    for kind in kinds:
        form = stiffness[kind].to("cpu", torch.float64, copy=True)
        # A sum is finite only if every entry is (stiffness is bounded: no overflow).
        if bool(torch.isfinite(form.sum())):
            if same_set:
                form.fill_diagonal_(0.0)
            out[kind] = _outer_kept_draws(form, None, None, same_class, w_r, w_c, members_r, members_c, same_set)
            continue
        valid = torch.isfinite(form)
        if same_set:
            valid.fill_diagonal_(False)
        form.masked_fill_(~valid, 0.0)
        kept_r, kept_c = valid.any(dim=1), valid.any(dim=0)
        outer = kept_r[:, None] & kept_c[None, :]
        if same_set:
            outer.fill_diagonal_(False)
        if torch.equal(valid, outer):
            out[kind] = _outer_kept_draws(
                form, kept_r.double(), kept_c.double(), same_class, w_r, w_c, members_r, members_c, same_set
            )
        else:
            out[kind] = _chunked_draws(form, valid.double(), w_r, w_c, labels_c, members_r, num_classes)
    return out


def _outer_kept_draws(
    form: Tensor,
    kept_r: Tensor | None,
    kept_c: Tensor | None,
    same_class: Tensor,
    w_r: Tensor,
    w_c: Tensor,
    members_r: "_Members",
    members_c: "_Members",
    same_set: bool,
) -> tuple[Tensor, Tensor]:
    """Within and between draws [B] when the kept pairs are those of kept rows and columns (``kept_r``, ``kept_c``;
    None: all), self-pairs aside. ``form``: the float64 values, 0 where left out (overwritten); ``same_class``: the
    [2, P] same-class pairs (row-major)."""
    n, m = form.shape
    kept_w_r = w_r if kept_r is None else w_r * kept_r
    kept_w_c = w_c if kept_c is None else w_c * kept_c
    totals_r = members_r.sums(kept_w_r.T)  # [C, B]: U_a (exact small integers)
    totals_c = members_c.sums(kept_w_c.T)  # V_b
    # Within: each class's own block (the same-class pairs, sparse), over its count U_a V_a less the self-pairs.
    pair_rows, pair_cols = same_class
    crow = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(pair_rows, minlength=n), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        blocks = torch.sparse_csr_tensor(crow, pair_cols, form[pair_rows, pair_cols], (n, m), check_invariants=False)
        per_row = (blocks @ w_c.T.contiguous()).mul_(w_r.T)  # [N, B]
    within_sums = members_r.sums(per_row)
    counts = totals_r * totals_c
    if same_set:  # an example's pairs with its own copies
        self_pairs = kept_w_r * w_r if kept_c is None else kept_w_r * w_r * kept_c
        counts -= members_r.sums(self_pairs.T)
    within = _masked_means(within_sums, counts)
    # Between: the mean over class pairs a != b with U_a V_b > 0 of S_ab / (U_a V_b).
    form[pair_rows, pair_cols] = 0.0  # the pairs of different classes
    scaled_r = kept_w_r / totals_r.T[:, members_r.labels].clamp_min(1)  # zero where U = 0 (then every weight is)
    scaled_c = kept_w_c / totals_c.T[:, members_c.labels].clamp_min(1)
    between_sums = ((scaled_r @ form) * scaled_c).sum(dim=1)
    has_r, has_c = totals_r > 0, totals_c > 0
    class_pairs = has_r.sum(dim=0) * has_c.sum(dim=0) - (has_r & has_c).sum(dim=0)
    between = torch.where(class_pairs > 0, between_sums / class_pairs.clamp_min(1), torch.nan)
    return within, between


class _Members(NamedTuple):
    """A set's examples by class: ``labels`` [n], their order by class and the class sizes [C]."""

    labels: Tensor
    order: Tensor
    lengths: Tensor

    @staticmethod
    def of(labels: Tensor, num_classes: int) -> "_Members":
        labels = labels.long()
        return _Members(labels, torch.argsort(labels, stable=True), torch.bincount(labels, minlength=num_classes))

    def sums(self, values: Tensor) -> Tensor:
        """Per class, the sum of the rows of ``values`` [n, ...] of its examples: [C, ...] (0 for an empty class)."""
        return torch.segment_reduce(values[self.order], "sum", lengths=self.lengths, axis=0)


def _masked_means(sums: Tensor, counts: Tensor) -> Tensor:
    """Per draw, the mean over classes of ``sums / counts`` ([C, B] each) where the count is positive (NaN: none)."""
    has = counts > 0
    ratios = torch.where(has, sums / counts.clamp_min(1), torch.zeros_like(sums))
    kept = has.sum(dim=0)
    return torch.where(kept > 0, ratios.sum(dim=0) / kept.clamp_min(1), torch.nan)


def _chunked_draws(
    form: Tensor, valid: Tensor, w_r: Tensor, w_c: Tensor, labels_c: Tensor, members_r: "_Members", num_classes: int
) -> tuple[Tensor, Tensor]:
    """Within and between draws [B] from each draw's class matrix of sums and counts, in chunks of draws whose
    class matrices and column sums stay under :data:`CLASS_CHUNK_BYTES`."""
    num_draws, n = w_r.shape
    per_draw = 8 * (2 * n * num_classes + 4 * num_classes * num_classes)
    chunk = max(1, min(num_draws, CLASS_CHUNK_BYTES // per_draw))
    within, between = torch.empty(num_draws, dtype=torch.float64), torch.empty(num_draws, dtype=torch.float64)
    diagonal = torch.eye(num_classes, dtype=torch.bool)
    for start in range(0, num_draws, chunk):
        draws = torch.arange(start, min(num_draws, start + chunk))
        sums = _chunk_class_sums(form, w_r, w_c, members_r, labels_c, num_classes, draws)
        counts = _chunk_class_sums(valid, w_r, w_c, members_r, labels_c, num_classes, draws)
        matrix = torch.where(counts > 0, sums.div_(counts.clamp_min(1)), torch.nan)  # [C, C, k]
        within[draws] = matrix[diagonal].nanmean(dim=0)
        between[draws] = matrix[~diagonal].nanmean(dim=0)
    return within, between


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


def xi_draws(sums: Tensor) -> Tensor:
    """Critical distance of each draw from its line sums [5, B] (n, sum x, sum y, sum x^2, sum xy); +inf where the
    fitted line does not fall, NaN where it is undefined (fewer than two distinct distances)."""
    n, sx, sy, sxx, sxy = sums.double()
    spread = n * sxx - sx * sx
    # The sums come from float32 products: a draw whose pairs all share one distance leaves a spread of float32
    # rounding (about 1e-7 of n * sum x^2), not 0. Distances that vary less than that relatively have no line.
    defined = (n >= 2) & (spread > 1e-5 * (n * sxx).clamp_min(1e-300))
    slope = (n * sxy - sx * sy) / torch.where(defined, spread, torch.ones_like(spread))
    intercept = (sy - slope * sx) / n.clamp_min(1)
    xi = torch.where(slope < 0, -intercept / torch.where(slope < 0, slope, -torch.ones_like(slope)), torch.inf)
    return torch.where(defined, xi, torch.full_like(xi, float("nan")))


def _same_class_line_sums(
    stiffness: Tensor, distances: Tensor, layout_r: tuple[Tensor, ...], layout_c: tuple[Tensor, ...], same_set: bool
) -> Tensor:
    """The five weighted line sums [5, B] over same-class valid pairs: the class blocks gathered at once (each set's
    :func:`_class_layout`), in the matrices' own order."""
    (rows, rows_in, w_rows), (cols, cols_in, w_cols) = layout_r, layout_c
    y, x = stiffness[rows[:, :, None], cols[:, None, :]], distances[rows[:, :, None], cols[:, None, :]]  # [C, p, q]
    valid = torch.isfinite(y) & torch.isfinite(x) & rows_in[:, :, None] & cols_in[:, None, :]
    if same_set:
        valid &= rows[:, :, None] != cols[:, None, :]
    x = torch.where(valid, x, torch.zeros_like(x)).float()
    y = torch.where(valid, y, torch.zeros_like(y)).float()
    forms = torch.stack([valid.float(), x, y, x * x, x * y], dim=1)  # [C, 5, p, q]
    per_row = forms @ w_cols[:, None]  # [C, 5, p, B]
    return (per_row * w_rows[:, None]).sum(dim=2).double().sum(dim=0)


def _class_layout(labels: Tensor, classes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A set's examples by class [C, width] (padded with example 0), which entries are real, and the weights of the
    draws laid out the same way [C, width, B]."""
    order = torch.argsort(labels, stable=True)  # by class, each class's examples ascending
    position = torch.searchsorted(classes, labels[order])  # each one's class, as a row of the layout
    sizes = torch.bincount(position, minlength=classes.numel())
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(labels.numel()) - starts[position]
    width = max(1, int(sizes.max()) if sizes.numel() else 0)
    index = torch.zeros(classes.numel(), width, dtype=torch.long)
    real = torch.zeros(classes.numel(), width, dtype=torch.bool)
    index[position, rank], real[position, rank] = order, True
    return index, real, weights.T[index].contiguous()


class Intervals(NamedTuple):
    """A probe's 95% intervals, by structure.

    Attributes:
        classes: pair -> kind -> side (``"within"``, ``"between"``) -> ``(low, high)`` of within/between-class
            stiffness.
        critical_distances: pair -> space (``"input"`` or a layer) -> ``(low, high)`` of xi.
    """

    classes: dict[str, dict[str, dict[str, tuple[float, float]]]]
    critical_distances: dict[str, dict[str, tuple[float, float]]]


def bootstrap_intervals(
    stiffness: dict[str, dict[str, Tensor]],
    distances: dict[str, dict[str, Tensor]],
    labels: dict[str, Tensor],
    kinds: tuple[str, ...],
    xi_kind: str,
    num_classes: int,
    num_draws: int,
    generator: torch.Generator | None,
    weights: dict[str, Tensor] | None = None,
) -> Intervals:
    """95% percentile intervals of within/between-class stiffness (each pair and kind) and of each critical distance.

    Args:
        stiffness: pair -> kind -> [N, M] stiffness matrix (a result's ``classes[pair][kind][MODEL].stiffness``).
        distances: pair -> space (``"input"`` or a layer) -> [N, M] distances; one critical distance interval each,
            fitted on ``xi_kind`` stiffness over same-class pairs.
        labels: probe set -> [n] labels.
        kinds, xi_kind, num_classes: as in the result.
        num_draws: bootstrap draws B (at least 2).
        generator: the source of the draws (the same draws for the same seed, on every process); None only with
            ``weights``.
        weights: the draws already made (:func:`draw_weights`, ``num_draws`` each), to share them with
            :func:`curve_bands`; default: drawn here from ``generator``.

    Returns:
        The intervals of each pair present in ``stiffness`` and ``labels``, by structure.

    Raises:
        ValueError: when neither ``generator`` nor ``weights`` is given.
    """
    if weights is None:
        if generator is None:
            raise ValueError("bootstrap_intervals needs a `generator` to draw from, or the draws' `weights`.")
        weights = draw_weights(labels, num_draws, generator)
    weights = {name: w.cpu().float() for name, w in weights.items()}
    labels = {name: y.cpu() for name, y in labels.items()}
    classes = torch.unique(torch.cat(list(labels.values())))
    layouts = {name: _class_layout(labels[name], classes, weights[name]) for name in labels}
    # ("classes", pair, kind, side) or ("critical_distances", pair, space), and the draws of each.
    keys: list[tuple[str, ...]] = []
    draws: list[Tensor] = []
    for pair, (rows, cols) in PAIRS.items():
        if rows not in labels or cols not in labels or pair not in stiffness:
            continue
        found = _class_draws(
            stiffness[pair], pair, kinds, labels[rows], labels[cols], weights[rows], weights[cols], num_classes
        )
        for kind, sides in found.items():
            keys += [("classes", pair, kind, side) for side in SIDES]
            draws += list(sides)
        values = stiffness[pair][xi_kind].cpu()
        for space, matrix in distances.get(pair, {}).items():
            line = _same_class_line_sums(values, matrix.cpu(), layouts[rows], layouts[cols], rows == cols)
            keys.append(("critical_distances", pair, space))
            draws.append(xi_draws(line))
    out = Intervals({}, {})
    if not keys:
        return out
    low, high = _percentile_bounds(torch.stack([d.double() for d in draws], dim=1))
    for key, ends in zip(keys, zip(low.tolist(), high.tolist(), strict=True), strict=True):
        field, pair, *rest = key
        target = getattr(out, field).setdefault(pair, {})
        if field == "classes":
            target.setdefault(rest[0], {})[rest[1]] = ends
        else:
            target[rest[0]] = ends
    return out


def curve_bands(
    stiffness: dict[str, dict[str, Tensor]],
    distances: dict[str, dict[str, Tensor]],
    edges: dict[str, dict[str, Tensor]],
    labels: dict[str, Tensor],
    xi_kind: str,
    weights: dict[str, Tensor],
) -> dict[str, dict[str, dict[str, tuple[Tensor, Tensor]]]]:
    """95% percentile bands around each distance curve: in each bin, the interval of the draws' bin means.

    Args:
        stiffness: pair -> kind -> [N, M] stiffness matrix (the curves are of ``xi_kind``).
        distances: pair -> space (``"input"`` or a layer) -> [N, M] distances, one curve each.
        edges: pair -> space -> the curve's bin edges (``spaces[pair][space].curves["within"].edges``).
        labels: probe set -> [n] labels.
        xi_kind: the kind of stiffness the curves show.
        weights: probe set -> [B, n] weights of the draws (:func:`draw_weights`).

    Returns:
        Pair -> space -> ``{"within": (low, high), "between": (low, high)}``, float64 CPU tensors [bins]: NaN ends
        where no draw has a pair in the bin (a bin empty in the probe).
    """
    out: dict[str, dict[str, dict[str, tuple[Tensor, Tensor]]]] = {}
    for pair, by_space in distances.items():
        rows, cols = PAIRS[pair]
        values = stiffness[pair][xi_kind]
        for space, matrix in by_space.items():
            draws = bin_mean_draws(
                values, matrix, edges[pair][space], labels[rows], labels[cols], weights[rows], weights[cols],
                rows == cols,
            )  # fmt: skip
            low, high = _percentile_bounds(draws)  # [2, bins] each
            out.setdefault(pair, {})[space] = {side: (low[index], high[index]) for index, side in enumerate(SIDES)}
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
    values = values.cpu().float()
    entries = _merged_entries(keep, slot, values, 2 * num_bins) if same_set else None
    matrix = _slot_matrix(keep, slot, values, 2 * num_bins, entries)
    num, den = _weighted_slot_sums(matrix, w_rows.cpu().float(), w_cols.cpu().float(), 2 * num_bins).double()
    means = num.div_(den).masked_fill_(den == 0, float("nan"))
    return means.view(-1, 2, num_bins)


def _pair_slots(
    values: Tensor, distances: Tensor, edges: Tensor, labels_r: Tensor, labels_c: Tensor, same_set: bool
) -> tuple[Tensor, Tensor]:
    """The pairs of the curve ([N, M] bool) and each pair's slot, side * bins + bin ([N, M] int32)."""
    edges = edges.double().cpu()
    distances = distances.cpu().double()
    keep = (distances >= edges[0]) & (distances <= edges[-1])  # NaN distances too are left out
    if not bool(torch.isfinite(values.sum())):  # stiffness is bounded: a sum is finite only if every entry is
        keep &= torch.isfinite(values.cpu())
    if same_set:
        keep.fill_diagonal_(False)
    slot = _bin_index(distances, edges)
    slot += (labels_r.cpu()[:, None] != labels_c.cpu()[None, :]).int().mul_(edges.numel() - 1)
    return keep, slot


def _bin_index(distances: Tensor, edges: Tensor) -> Tensor:
    """Bin of each float64 distance as :func:`~lightning_stiffness.measures.functional.binned_sums` finds it (``[e_k,
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


def _merged_entries(keep: Tensor, slot: Tensor, values: Tensor, slots: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Within a set (the same weights on both sides): the entries (row key, column, value, count) of the pairs (i, j),
    i < j, each holding (j, i) as well where both are kept in the same slot, then the rare (j, i) left on their own
    (a distance on a bin edge, rounded differently). Row key ``i * slots + slot``, ``N * slots`` for a pair left out."""
    n = keep.shape[0]
    rows, cols = _upper_pairs(n) if n <= 1024 else _upper_pairs.__wrapped__(n)  # kept for small sets only
    upper, lower = rows.long() * n + cols, cols.long() * n + rows
    packed = slot.masked_fill(~keep, slots).flatten()  # slot, or `slots` where the pair is left out
    slot_u, slot_l = packed[upper], packed[lower]
    value_u, value_l = values.flatten()[upper], values.flatten()[lower]
    merged = (slot_u == slot_l) & (slot_l < slots)
    key = torch.where(slot_u < slots, rows * slots + slot_u, n * slots)
    entry = (key, cols, torch.where(merged, value_u + value_l, value_u), merged.float().add_(1))
    alone = (slot_l < slots) & ~merged
    if not bool(alone.any()):
        return entry
    alone = torch.nonzero(alone).flatten()
    extra = (cols[alone] * slots + slot_l[alone], rows[alone], value_l[alone], torch.ones(alone.numel()))
    keys, columns, merged_values, counts = (torch.cat(pair) for pair in zip(entry, extra, strict=True))
    return keys, columns, merged_values, counts


@functools.lru_cache(maxsize=2)
def _upper_pairs(n: int) -> tuple[Tensor, Tensor]:
    """Rows and columns (int32) of the pairs i < j of n examples."""
    rows, cols = torch.triu_indices(n, n, 1, dtype=torch.int32)
    return rows, cols


def _slot_matrix(
    keep: Tensor, slot: Tensor, values: Tensor, slots: int, entries: tuple[Tensor, ...] | None = None
) -> Tensor:
    """Sparse CSR [2 N slots, M]: row (i, k) holds the values of the kept pairs (i, j) in slot k at columns j; the
    next N slots rows hold their counts. ``entries``: the pairs as :func:`_merged_entries` lists them (default: every
    kept pair of the matrices, counted once)."""
    n, m = keep.shape
    num_rows = n * slots
    if entries is None:
        key = torch.arange(0, num_rows, slots, dtype=torch.int32)[:, None] + slot
        key = key.masked_fill_(~keep, num_rows).flatten()  # pairs left out sort last
        cols, values, counts = None, values.flatten(), None
    else:
        key, cols, values, counts = entries
    key, order = torch.sort(key.to(torch.int16 if num_rows < 2**15 - 1 else torch.int32))
    nnz = int(torch.searchsorted(key, num_rows))
    key, order = key[:nnz], order[:nnz]
    index = torch.int32 if 2 * nnz < 2**31 else torch.int64  # MKL's own index type, when it holds them
    crow = torch.zeros(2 * num_rows + 1, dtype=index)
    torch.cumsum(torch.bincount(key, minlength=num_rows).repeat(2), 0, out=crow[1:])
    cols = (order % m if cols is None else cols[order]).to(index)
    counts = torch.ones(nnz) if counts is None else counts[order]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(
            crow, cols.repeat(2), torch.cat([values[order], counts]), (2 * num_rows, m), check_invariants=False
        )


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
    """:func:`percentile_interval` of ``draws`` [B, ...] along the draws, for every other index at once: the same
    order statistics of the draws that are not NaN (NaN where none is)."""
    tail = (1 - LEVEL) / 2
    ordered = draws.double().sort(dim=0).values  # NaN sort last
    kept = (~torch.isnan(ordered)).sum(dim=0, keepdim=True)
    last = (kept - 1).clamp_min(0).double()
    # torch.quantile's positions q (k - 1): "lower" takes their floor, "higher" their ceiling.
    low = ordered.gather(0, (tail * last).floor().long())
    high = ordered.gather(0, ((1 - tail) * last).ceil().long())
    return low[0], high[0]


__all__ = [
    "LEVEL",
    "Intervals",
    "add_intervals",
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


def interval_series(intervals: list[tuple[float, float] | None]) -> tuple[list[float], list[float]]:
    """Lower and upper ends of one scalar's interval across probes (``intervals``: each probe's, None where it has
    none); NaN where a probe has none, and where an end is infinite (so that a band drawn through them leaves a gap
    there)."""
    lows, highs = [], []
    for found in intervals:
        found = found or (math.nan, math.nan)
        lows.append(found[0] if math.isfinite(found[0]) else math.nan)
        highs.append(found[1] if math.isfinite(found[1]) else math.nan)
    return lows, highs


def add_intervals(result: "StiffnessResult", num_draws: int, seed: int) -> None:
    """Add to a probe's ``result`` (from its stiffness matrices) the bootstrap intervals of its within/between-class
    stiffness and critical distances and the bands around its distance curves, from one set of ``num_draws`` draws
    for both, each kept on the measure it belongs to (``intervals`` of the class measures, ``interval`` and ``bands``
    of the distance measures).

    The draws come from a generator seeded with ``seed`` and the probe's step, so a rerun gives the same intervals.

    Raises:
        ValueError: for a result without its stiffness matrices (``result.has_stiffness``).
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + result.step) % 2**63)
    weights = draw_weights(result.labels, num_draws, generator)  # one set of draws for both
    stiffness: dict[str, dict[str, Tensor]] = {}
    for pair, by_kind in result.classes.items():
        for kind, layers in by_kind.items():
            matrix = layers[MODEL].stiffness
            if matrix is None:
                raise ValueError(f"intervals need the {pair} {kind} stiffness matrix; the result lacks it.")
            stiffness.setdefault(pair, {})[kind] = matrix
    distances = {
        pair: {space: m.distances for space, m in by_space.items()} for pair, by_space in result.spaces.items()
    }
    found = bootstrap_intervals(
        stiffness, distances, result.labels, result.kinds, result.xi_kind, result.num_classes, num_draws, generator,
        weights=weights,
    )  # fmt: skip
    for pair, intervals_by_kind in found.classes.items():
        for kind, sides in intervals_by_kind.items():
            result.classes[pair][kind][MODEL].intervals = sides
    for pair, xi_by_space in found.critical_distances.items():
        for space, ends in xi_by_space.items():
            result.spaces[pair][space].interval = ends
    edges = {
        pair: {space: m.curves["within"].edges for space, m in by_space.items()}
        for pair, by_space in result.spaces.items()
    }
    bands = curve_bands(stiffness, distances, edges, result.labels, result.xi_kind, weights)
    for pair, bands_by_space in bands.items():
        for space, band_sides in bands_by_space.items():
            result.spaces[pair][space].bands = band_sides
