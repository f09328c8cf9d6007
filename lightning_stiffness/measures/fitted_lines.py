"""The straight lines behind the critical distance ξ: the paper's least-squares line through all same-class pairs,
and beside it the line through the within-class bin means (each non-empty bin weighted equally).

The first is the default everywhere (the logged ``critical_distance`` scalars); the second shows how much the many
pairs at small distances weigh in the first. Both are saved in the raw results (``line_fits``) and drawn.
"""

import math

from lightning_stiffness.measures.functional import DistanceCurve, LineFitSums, critical_distance_from_sums
from lightning_stiffness.names import FITS


def least_squares_line(sums: LineFitSums) -> tuple[float, float]:
    """``(intercept, slope)`` of the least-squares line with these sums; NaNs when the slope is undefined."""
    n, sx, sy, sxx, sxy = sums
    spread = n * sxx - sx * sx
    if n < 2 or spread <= 1e-12 * max(n * sxx, 1e-300):
        return math.nan, math.nan
    slope = (n * sxy - sx * sy) / spread
    return (sy - slope * sx) / n, slope


def bin_mean_sums(curve: DistanceCurve) -> LineFitSums:
    """The line sums of the points (bin centre, bin mean) of the non-empty bins, each bin counted once."""
    centres = ((curve.edges[1:] + curve.edges[:-1]) / 2).double()
    seen = curve.count > 0
    x, y = centres[seen], curve.mean.double()[seen]
    return LineFitSums(float(x.numel()), float(x.sum()), float(y.sum()), float((x * x).sum()), float((x * y).sum()))


def observed_range(curve: DistanceCurve) -> tuple[float, float]:
    """From the left edge of the first non-empty bin to the right edge of the last one (NaNs when all are empty)."""
    seen = (curve.count > 0).nonzero().flatten()
    if seen.numel() == 0:
        return math.nan, math.nan
    return float(curve.edges[seen[0]]), float(curve.edges[seen[-1] + 1])


def extrapolated(xi: float, low: float, high: float) -> bool | None:
    """Whether ``xi`` lies outside the observed range ``[low, high]`` of the distances its line was fitted on: it is
    then where the line would cross zero if it went on, not a distance at which stiffness was seen to vanish. None
    when there is no xi (NaN or inf: the line does not fall) or no observed range."""
    if not math.isfinite(xi) or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return not low <= xi <= high


def line_fits(pair_sums: LineFitSums, within: DistanceCurve) -> dict[str, dict[str, float]]:
    """Both fits of one distance curve, by name in :data:`~lightning_stiffness.names.FITS`: ``intercept``,
    ``slope``, ``xi`` (the zero crossing, NaN unless the line falls) and the observed range ``low``, ``high``."""
    low, high = observed_range(within)
    fits = {}
    for name, sums in zip(FITS, (pair_sums, bin_mean_sums(within)), strict=True):
        intercept, slope = least_squares_line(sums)
        fits[name] = {
            "intercept": intercept,
            "slope": slope,
            "xi": critical_distance_from_sums(sums),
            "low": low,
            "high": high,
        }
    return fits
