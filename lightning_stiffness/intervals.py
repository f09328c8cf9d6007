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
"""

import math

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
    generator: torch.Generator,
    prefix: str = PREFIX,
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

    Returns:
        Scalar tag (as logged) -> ``(low, high)``.
    """
    weights = {name: bootstrap_weights(y, num_draws, generator) for name, y in labels.items()}
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


def _not_self(n: int, m: int, same_set: bool) -> Tensor:
    if same_set:
        return ~torch.eye(n, m, dtype=torch.bool)
    return torch.ones(n, m, dtype=torch.bool)


__all__ = [
    "LEVEL",
    "bootstrap_intervals",
    "bootstrap_weights",
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
