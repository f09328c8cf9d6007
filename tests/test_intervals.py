"""Bootstrap intervals: each draw equals the measure recomputed on the resampled examples (a loop over pairs), the
intervals cover the population's exact value at about the nominal rate, and shrink as the probe grows."""

import math

import pytest
import torch

from lightning_stiffness.functional import class_stiffness, cosine_stiffness, critical_distance, within_between
from lightning_stiffness.measures.intervals import (
    bootstrap_intervals,
    bootstrap_weights,
    percentile_interval,
    weighted_class_sums,
    xi_draws,
)
from lightning_stiffness.names import INPUT


def _population(classes: int = 3, per_class: int = 300, dim: int = 12, seed: int = 0):
    """Gradients with class structure: a class mean plus noise, so within-class stiffness is positive."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    grads = means[labels] * 0.6 + torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return grads, labels


def test_bootstrap_weights_keep_each_class_size():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    weights = bootstrap_weights(labels, 50, torch.Generator().manual_seed(0))
    assert weights.shape == (50, 9)
    for c in range(3):
        assert torch.all(weights[:, labels == c].sum(dim=1) == (labels == c).sum())


def test_a_draw_equals_the_measure_of_the_resampled_examples():
    # The weighted sums must be the class matrix of the examples drawn (copies of one example never paired).
    grads, labels = _population(per_class=6)
    cos = cosine_stiffness(grads @ grads.T)
    generator = torch.Generator().manual_seed(1)
    weights = bootstrap_weights(labels, 4, generator)
    valid = ~torch.eye(len(labels), dtype=torch.bool)
    forms = torch.stack([torch.where(valid, cos, torch.zeros_like(cos)).float(), valid.float()])
    sums = weighted_class_sums(forms, weights, weights, labels, labels, 3)
    for draw in range(4):
        drawn = torch.repeat_interleave(torch.arange(len(labels)), weights[draw].long())
        total = torch.zeros(3, 3, dtype=torch.float64)
        count = torch.zeros(3, 3, dtype=torch.float64)
        for p in range(len(drawn)):
            for q in range(len(drawn)):
                i, j = int(drawn[p]), int(drawn[q])
                if i != j:
                    total[labels[i], labels[j]] += cos[i, j]
                    count[labels[i], labels[j]] += 1
        assert torch.allclose(sums[0, draw].double(), total, atol=1e-4)
        assert torch.equal(sums[1, draw].double(), count)


def test_xi_draws_match_the_fit_of_each_draw():
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(40, generator=generator, dtype=torch.float64)
    y = 0.8 - x + 0.1 * torch.randn(40, generator=generator, dtype=torch.float64)
    sums = torch.stack([torch.tensor(40.0, dtype=torch.float64), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()])
    rising = torch.stack([torch.tensor(40.0, dtype=torch.float64), x.sum(), x.sum(), (x * x).sum(), (x * x).sum()])
    got = xi_draws(torch.stack([sums, rising], dim=1))
    expected = critical_distance(y[None, :], x[None, :], torch.ones(1, 40, dtype=torch.bool))
    assert got[0].item() == pytest.approx(expected) and got[1].item() == math.inf
    assert percentile_interval(torch.tensor([1.0, 2.0, math.inf] * 40))[1] == math.inf


def _probe_intervals(grads, labels, per_class, generator, draws=200):
    members = [torch.nonzero(labels == c).flatten() for c in range(3)]
    picks = torch.cat([m[torch.randperm(len(m), generator=generator)[:per_class]] for m in members])
    g, y = grads[picks], labels[picks]
    stiffness = {"train-train": {"cosine": cosine_stiffness(g @ g.T)}}
    intervals = bootstrap_intervals(stiffness, {}, {"train": y}, ("cosine",), "cosine", 3, draws, generator)
    return intervals, within_between(class_stiffness(stiffness["train-train"]["cosine"], y, num_classes=3))


def test_intervals_cover_the_population_value_at_about_the_nominal_rate():
    grads, labels = _population()
    exact = within_between(class_stiffness(cosine_stiffness(grads @ grads.T), labels, num_classes=3))
    generator = torch.Generator().manual_seed(5)
    hits, trials = [0, 0], 120
    for _ in range(trials):
        intervals, _ = _probe_intervals(grads, labels, 20, generator)
        for index, side in enumerate(("within", "between")):
            low, high = intervals.classes["train-train"]["cosine"][side]
            hits[index] += low <= exact[index] <= high
    rates = [h / trials for h in hits]
    # Nominal 95%; the percentile bootstrap of a mean over pairs runs a little narrow with 20 examples a class.
    assert all(0.85 <= rate <= 1.0 for rate in rates), rates


def test_intervals_shrink_as_examples_grow_and_are_reproducible():
    grads, labels = _population()
    widths = {}
    for per_class in (8, 64):
        generator = torch.Generator().manual_seed(7)
        runs = [_probe_intervals(grads, labels, per_class, generator, draws=100)[0] for _ in range(10)]
        ends = [r.classes["train-train"]["cosine"]["within"] for r in runs]
        widths[per_class] = sum(high - low for low, high in ends) / len(runs)
    assert widths[64] < widths[8] / 2.5, widths
    one = _probe_intervals(grads, labels, 10, torch.Generator().manual_seed(3))[0]
    two = _probe_intervals(grads, labels, 10, torch.Generator().manual_seed(3))[0]
    assert one == two


def test_every_scalar_gets_an_interval_around_its_estimate():
    grads, labels = _population(per_class=15)
    generator = torch.Generator().manual_seed(0)
    distances = torch.rand(45, 45, generator=generator, dtype=torch.float64)
    distances = (distances + distances.T) / 2
    distances.fill_diagonal_(0)
    cos = cosine_stiffness(grads @ grads.T)
    stiffness = {"train-train": {"cosine": cos, "sign": torch.sign(grads @ grads.T)}}
    intervals = bootstrap_intervals(
        stiffness,
        {"train-train": {INPUT: distances, "net.1": distances * 2}},
        {"train": labels},
        ("cosine", "sign"),
        "cosine",
        3,
        300,
        generator,
    )
    sides = {"within", "between"}
    assert {kind: set(ends) for kind, ends in intervals.classes["train-train"].items()} == {
        "cosine": sides,
        "sign": sides,
    }
    assert set(intervals.critical_distances) == {"train-train"}
    assert list(intervals.critical_distances["train-train"]) == [INPUT, "net.1"]
    within, between = within_between(class_stiffness(cos, labels, num_classes=3))
    for side, value in (("within", within), ("between", between)):
        low, high = intervals.classes["train-train"]["cosine"][side]
        assert low <= value <= high


def test_intervals_without_a_source_of_draws_or_the_stiffness_matrices_are_refused():
    from lightning_stiffness.measures.intervals import add_intervals
    from lightning_stiffness.measures.probe_measures import GramRows, measure_stiffness

    y = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="needs a `generator` to draw from, or the draws' `weights`"):
        bootstrap_intervals({}, {}, {"train": y}, ("cosine",), "cosine", 2, 5, None)
    grads = torch.randn(4, 3, dtype=torch.float64)
    gram = grads @ grads.T
    rows = GramRows(gram, torch.arange(4), gram.diagonal())  # no whole Gram matrix: no stiffness matrices kept
    result = measure_stiffness(rows, {"train": torch.randn(4, 2)}, {"train": y}, {"train": y}, num_classes=2)
    with pytest.raises(ValueError, match="intervals need the train-train cosine stiffness matrix"):
        add_intervals(result, 5, seed=0)
