"""Runs that differ only in their seed, aggregated: grouped by their hyperparameters without the seed, each measure
given as its mean over the seeds with a 95% Student-t interval of that mean (``mean ± t(0.975, n - 1) s / √n``, s the
sample standard deviation across seeds). The interval is about the seeds: how far the mean of another set of as
many seeds could lie; it says nothing of the probe examples (the bootstrap intervals within a run do that)."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.report.runs import Run

#: t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion around the normal quantile (error < 1e-4).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Summary:
    """A measure over seeds: the mean, its 95% t-interval (NaNs for fewer than two finite values), and how many
    seeds gave a finite value."""

    mean: float
    low: float
    high: float
    n: int


def summarise(values: Sequence[float]) -> Summary:
    """Mean and 95% t-interval of the finite ``values``."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0)
    mean = sum(finite) / n
    if n < 2:
        return Summary(mean, math.nan, math.nan, n)
    spread = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile(n - 1) * spread / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, n)


def canonical(value: Any) -> Any:
    """A hyperparameter comparable across loggers: numbers as floats (W&B writes 0.0 as 0), lists as tuples."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(canonical(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), canonical(v)) for k, v in value.items()))
    return str(value)


def settings_key(run: Run, ignore: Sequence[str]) -> tuple:
    """The run's hyperparameters without those in ``ignore``, comparable across loggers."""
    return tuple(sorted((key, canonical(value)) for key, value in run.hparams.items() if key not in ignore))


@dataclass
class SeedGroup:
    """Runs with the same hyperparameters but ``seed_key``; ``seeds`` in the runs' order."""

    runs: list[Run]
    seed_key: str

    @property
    def seeds(self) -> list[Any]:
        return [run.hparams.get(self.seed_key) for run in self.runs]

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyperparameters the runs share (all but the seed)."""
        return {k: v for k, v in self.runs[0].hparams.items() if k != self.seed_key}

    @property
    def steps(self) -> list[int]:
        """The steps every run probed."""
        common = set(self.runs[0].steps)
        for run in self.runs[1:]:
            common &= set(run.steps)
        return sorted(common)

    def over_training(self, measure: Callable[[StiffnessResult], float]) -> list[Summary]:
        """``measure`` of each run's probe at each of :attr:`steps`, summarised over the seeds."""
        by_step = [{r.step: r for r in run.results} for run in self.runs]
        return [summarise([measure(probes[step]) for probes in by_step]) for step in self.steps]

    def at_last(self, measure: Callable[[StiffnessResult], float]) -> Summary:
        """``measure`` at the last step every run probed, over the seeds."""
        return self.over_training(measure)[-1] if self.steps else Summary(math.nan, math.nan, math.nan, 0)

    def losses(self) -> dict[str, tuple[list[int], list[float]]]:
        """Each loss every run logged: its mean over the seeds at the steps all of them logged it at."""
        tags = set(self.runs[0].losses)
        for run in self.runs[1:]:
            tags &= set(run.losses)
        out = {}
        for tag in sorted(tags):
            series = [dict(run.losses[tag]) for run in self.runs]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if steps:
                out[tag] = (steps, [sum(s[step] for s in series) / len(series) for step in steps])
        return out


def seed_groups(runs: Sequence[Run], seed_key: str = "seed") -> list[SeedGroup]:
    """The runs grouped by their hyperparameters without ``seed_key``: a group of runs with distinct seeds that
    share every other hyperparameter; a run without ``seed_key`` (or with no hyperparameters) is a group of its
    own. Groups in the order of their first run."""
    groups: list[SeedGroup] = []
    keyed: dict[tuple, SeedGroup] = {}
    for run in runs:
        seed = run.hparams.get(seed_key)
        if seed is None:
            groups.append(SeedGroup([run], seed_key))
            continue
        key = settings_key(run, (seed_key,))
        group = keyed.get(key)
        if group is not None and all(canonical(seed) != canonical(s) for s in group.seeds):
            group.runs.append(run)
            continue
        group = SeedGroup([run], seed_key)
        keyed.setdefault(key, group)
        groups.append(group)
    return groups
