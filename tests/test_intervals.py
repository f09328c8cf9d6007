"""Bootstrap intervals: each draw equals the measure recomputed on the resampled examples (a loop over pairs), the
intervals cover the population's exact value at about the nominal rate, and shrink as the probe grows."""

import math

import pytest
import torch
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import (
    class_stiffness,
    cosine_stiffness,
    critical_distance,
    distance_bin_edges,
    within_between,
)
from lightning_stiffness.measures.intervals import (
    bootstrap_intervals,
    bootstrap_weights,
    curve_bands,
    draw_weights,
    percentile_interval,
    weighted_class_sums,
    xi_draws,
)
from lightning_stiffness.names import INPUT, SIDES, class_tag, critical_distance_tag
from tests.helpers import GROUPS, Data, Net, digits_sets, events, fit, probe_reference, probe_results
from tests.reference import (
    PAIRS,
    bin_means64,
    check_intervals_against_brute_force,
    class_matrix_loop,
    cos64,
    input_distance64,
    percentile64,
    weights_are_within_class_resamples,
    within_between64,
    xi64,
)


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


def _input_space(by_pair):
    """Pair -> a value of input space, as pair -> space -> value (the layout of curve_bands and bootstrap_intervals)."""
    return {pair: {INPUT: value} for pair, value in by_pair.items()}


def test_intervals_and_bands_equal_per_draw_loops_with_tiny_classes_missing_val_class_and_nan(tmp_path):
    """Class 9 has one training example, class 8 two; class 7 is missing from val; some examples have a zero
    gradient (NaN stiffness). Point estimates, every interval and every band against float64 loops."""
    train, val = digits_sets({9: 1, 8: 2}, {7: 0})
    data = Data(train, val)
    seed_everything(0)
    model = Net(dead_pixel=True)
    cb = StiffnessCallback(samples_per_class=4, kinds=["cosine"], seed=3, every_n_epochs=1, log_images=False)
    t, snaps = fit(tmp_path, model, data, cb)
    results = probe_results(t)
    assert len(results) == 2
    for result in results.values():
        _, cos, dist, _ = probe_reference({"dead_pixel": True}, snaps.states[result.step], result, data)
        assert any(torch.isnan(c).any() for c in cos.values()), "the case must have NaN stiffness"
        for pair, (r, c) in PAIRS.items():
            assert torch.allclose(result.stiffness[f"{pair}/cosine"].double(), cos[pair], atol=1e-5, equal_nan=True)
            m = class_matrix_loop(cos[pair], result.labels[r], result.labels[c], 10, r == c)
            wi, be = within_between64(m)
            assert result.within_class[f"{pair}/cosine"] == pytest.approx(wi, abs=1e-5)
            assert result.between_class[f"{pair}/cosine"] == pytest.approx(be, abs=1e-5)
            assert result.critical_distance[pair] == pytest.approx(
                xi64(cos[pair], dist[pair], result.labels[r], result.labels[c], r == c), rel=1e-4, abs=1e-5
            )
        check_intervals_against_brute_force(result, cos, dist, seed=3)


def test_intervals_with_layers_two_draws_and_zero_draws(tmp_path):
    train, val = digits_sets()
    data = Data(train, val)
    seed_everything(1)
    cb = StiffnessCallback(
        samples_per_class=3, kinds=["cosine"], layers=["net.1"], num_bootstrap=2, every_n_epochs=0, log_images=False
    )
    t, snaps = fit(tmp_path / "two", Net(), data, cb)
    (result,) = probe_results(t).values()
    assert "train-val/net.1" in result.curve_intervals
    assert "stiffness/train-val/critical_distance/net.1" in result.intervals
    _, cos, dist, ldist = probe_reference({}, snaps.states[result.step], result, data, layer="net.1")
    check_intervals_against_brute_force(result, cos, dist, seed=0, ldist=ldist, layer="net.1", num_draws=2)

    seed_everything(1)
    cb = StiffnessCallback(samples_per_class=3, kinds=["cosine"], num_bootstrap=0, every_n_epochs=0)
    t, _ = fit(tmp_path / "zero", Net(), data, cb)
    (result,) = probe_results(t).values()
    assert result.intervals == {} and result.curve_intervals == {}
    assert "stiffness/train-val/distance_curve" in events(t.log_dir).Tags()["images"]


def test_num_bootstrap_one_or_negative_is_refused_naming_the_argument():
    for bad in (1, -1):
        with pytest.raises(MisconfigurationException, match="num_bootstrap"):
            StiffnessCallback(num_bootstrap=bad)


def test_intervals_are_reproducible_seeded_contain_the_estimate_and_bands_bracket_bin_means(tmp_path):
    train, val = digits_sets()
    data = Data(train, val)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        seed_everything(0)
        cb = StiffnessCallback(samples_per_class=6, seed=seed, every_n_epochs=0, log_images=False)
        t, _ = fit(tmp_path / name, Net(), data, cb)
        (runs[name],) = probe_results(t).values()
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.intervals == b.intervals
    for key in a.curve_intervals:
        for side in ("within", "between"):
            for x, y in zip(a.curve_intervals[key][side], b.curve_intervals[key][side], strict=True):
                assert torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0))
    assert a.intervals != c.intervals  # another seed: other probe examples and other draws
    # Typical case: each interval contains its estimate; band ends bracket well-filled bins' means.
    for pair in a.pairs:
        for kind in a.kinds:
            for side, values in (("within_class", a.within_class), ("between_class", a.between_class)):
                low, high = a.intervals[f"stiffness/{pair}/{kind}/{side}"]
                assert low <= values[f"{pair}/{kind}"] <= high, (pair, kind, side)
        low, high = a.intervals[f"stiffness/{pair}/critical_distance/input"]
        assert low <= a.critical_distance[pair] <= high
        for side in ("within", "between"):
            curve = a.curves[pair][side]
            band_low, band_high = a.curve_intervals[pair][side]
            for k in range(len(curve.count)):
                if curve.count[k] >= 100:
                    assert band_low[k] <= curve.mean[k] <= band_high[k], (pair, side, k)


def test_quantile_edges_bands_against_a_loop():
    """curve_bands with unequal-width (quantile) edges, NaN stiffness and a class of one example."""
    g = torch.Generator().manual_seed(0)
    labels = {"train": torch.tensor([0] * 6 + [1] * 5 + [2] * 1), "val": torch.tensor([0] * 4 + [1] * 5)}
    feats = {k: torch.randn(len(v), 5, generator=g, dtype=torch.float64) + v[:, None] for k, v in labels.items()}
    grads = {k: torch.randn(len(v), 7, generator=g, dtype=torch.float64) + v[:, None] for k, v in labels.items()}
    grads["train"][2] = 0
    stiffness, distances, edges = {}, {}, {}
    for pair, (r, c) in PAIRS.items():
        stiffness[f"{pair}/cosine"] = cos64(grads[r], grads[c])
        distances[pair] = input_distance64(feats[r], feats[c])
        mask = ~torch.eye(len(labels[r]), dtype=torch.bool) if r == c else None
        edges[pair] = distance_bin_edges(distances[pair], mask, 4, binning="quantile")
    weights = draw_weights(labels, 60, torch.Generator().manual_seed(1))
    weights_are_within_class_resamples(weights, labels)
    nested = {pair: {"cosine": stiffness[f"{pair}/cosine"]} for pair in PAIRS}
    bands = curve_bands(nested, _input_space(distances), _input_space(edges), labels, "cosine", weights)
    bands = {pair: by_space[INPUT] for pair, by_space in bands.items()}
    for pair, (r, c) in PAIRS.items():
        means = torch.stack(
            [
                bin_means64(
                    stiffness[f"{pair}/cosine"],
                    distances[pair],
                    edges[pair],
                    labels[r],
                    labels[c],
                    r == c,
                    weights[r][b],
                    weights[c][b],
                )
                for b in range(60)
            ]
        )
        for si, side in enumerate(("within", "between")):
            for k in range(4):
                want = percentile64(means[:, si, k].tolist())
                got = (float(bands[pair][side][0][k]), float(bands[pair][side][1][k]))
                assert got == pytest.approx(want, abs=1e-6, nan_ok=True), (pair, side, k)


@pytest.mark.parametrize("n", [900, 1100])
def test_bands_and_intervals_of_large_probe_sets_against_vectorised_definitions(n):
    """Sizes past the int16 sort keys (n * 2 * bins >= 2**15) and past the cached pair list (n > 1024)."""
    g = torch.Generator().manual_seed(n)
    labels = {"train": torch.randint(0, 10, (n,), generator=g)}
    grads = torch.randn(n, 6, generator=g, dtype=torch.float64) + 0.5 * labels["train"][:, None].double()
    feats = torch.randn(n, 5, generator=g, dtype=torch.float64) + labels["train"][:, None].double()
    cos = cos64(grads, grads)
    dist = input_distance64(feats, feats).clamp_min(0)
    distances = {"train-train": dist}
    mask = ~torch.eye(n, dtype=torch.bool)
    edges = {"train-train": distance_bin_edges(dist, mask, 20)}
    weights = draw_weights(labels, 3, torch.Generator().manual_seed(2))
    nested = {"train-train": {"cosine": cos}}
    bands = curve_bands(nested, _input_space(distances), _input_space(edges), labels, "cosine", weights)
    bands = {pair: by_space[INPUT] for pair, by_space in bands.items()}
    found = bootstrap_intervals(
        nested, _input_space(distances), labels, ("cosine",), "cosine", 10, 3, None, weights=weights
    )
    intervals = {
        class_tag("train-train", "cosine", side): found.classes["train-train"]["cosine"][side] for side in SIDES
    }
    intervals[critical_distance_tag("train-train")] = found.critical_distances["train-train"][INPUT]
    y = labels["train"]
    k = torch.bucketize(dist, edges["train-train"][1:-1], right=True).clamp_max(19)
    side = (y[:, None] != y[None, :]).long()
    slot = (side * 20 + k)[mask]
    draws, within, between, xis = [], [], [], []
    for b in range(3):
        w = (weights["train"][b].double()[:, None] * weights["train"][b].double()[None, :])[mask]
        num = torch.bincount(slot, weights=w * cos[mask], minlength=40)
        den = torch.bincount(slot, weights=w, minlength=40)
        draws.append(torch.where(den > 0, num / den, torch.full_like(num, math.nan)))
        m = class_matrix_loop(cos, y, y, 10, True, weights["train"][b], weights["train"][b])
        within.append(within_between64(m)[0])
        between.append(within_between64(m)[1])
        xis.append(xi64(cos, dist, y, y, True, weights["train"][b], weights["train"][b]))
    draws = torch.stack(draws).view(3, 2, 20)
    for si, s in enumerate(("within", "between")):
        for b in range(20):
            want = percentile64(draws[:, si, b].tolist())
            got = (float(bands["train-train"][s][0][b]), float(bands["train-train"][s][1][b]))
            assert got == pytest.approx(want, abs=1e-5, nan_ok=True), (s, b)
    assert intervals["stiffness/train-train/cosine/within_class"] == pytest.approx(percentile64(within), abs=1e-5)
    assert intervals["stiffness/train-train/cosine/between_class"] == pytest.approx(percentile64(between), abs=1e-5)
    assert intervals["stiffness/train-train/critical_distance/input"] == pytest.approx(percentile64(xis), rel=1e-4)


def test_sign_and_cosine_intervals_with_a_class_missing_from_train(tmp_path):
    """Both kinds, class 3 absent from the training data (present in val), zero-gradient examples."""
    train, val = digits_sets({3: 0, 9: 2}, None)
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, seed=1, every_n_epochs=0, log_images=False, num_bootstrap=50)
    t, snaps = fit(tmp_path, Net(dead_pixel=True), data, cb)
    (result,) = probe_results(t).values()
    assert result.num_classes == 10 and 3 not in result.labels["train"].tolist()
    g, cos, dist, _ = probe_reference({"dead_pixel": True}, snaps.states[result.step], result, data)
    sign = {}
    for pair, (r, c) in PAIRS.items():
        gram = g[r] @ g[c].T
        sign[pair] = torch.sign(gram)
        stored = result.stiffness[f"{pair}/sign"].double()
        clear = cos[pair].abs().nan_to_num(1.0) > 1e-4  # signs of near-zero products may round either way
        assert torch.equal(stored[clear], sign[pair][clear]), pair
        m = class_matrix_loop(sign[pair], result.labels[r], result.labels[c], 10, r == c)
        assert result.within_class[f"{pair}/sign"] == pytest.approx(within_between64(m)[0], abs=1e-6)
    check_intervals_against_brute_force(result, cos, dist, seed=1, num_draws=50, sign=sign)


def test_a_sign_only_probe_fits_xi_and_its_interval_on_sign(tmp_path):
    train, val = digits_sets()
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, kinds=["sign"], every_n_epochs=0, log_images=False, num_bootstrap=40)
    t, snaps = fit(tmp_path, Net(), data, cb)
    (result,) = probe_results(t).values()
    assert result.xi_kind == "sign"
    g, cos, dist, _ = probe_reference({}, snaps.states[result.step], result, data)
    sign = {pair: torch.sign(g[r] @ g[c].T) for pair, (r, c) in PAIRS.items()}
    check_intervals_against_brute_force(result, cos, dist, seed=0, num_draws=40, sign=sign)


class TrainOnly(LightningDataModule):
    def __init__(self, train):
        super().__init__()
        self.train_set = train

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)


def test_without_validation_data_everything_is_train_train(tmp_path):
    train, _ = digits_sets()
    data = TrainOnly(train)
    data.val_set = None
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, kinds=["cosine"], every_n_epochs=0, num_bootstrap=30,
                           class_groups=GROUPS, log_images=True)  # fmt: skip
    t, snaps = fit(tmp_path, Net(), data, cb)
    (result,) = probe_results(t).values()
    assert result.pairs == ["train-train"]
    assert set(result.gradient_coherence) == {"train"}
    assert set(result.group_matrices) == {"train-train/cosine"}
    _, cos, dist, _ = probe_reference({}, snaps.states[result.step], result, data)
    check_intervals_against_brute_force(result, cos, dist, seed=0, num_draws=30)
    tags = events(t.log_dir).Tags()
    assert "stiffness/train-train/cosine/group_matrix" in tags["images"]
    assert "stiffness/val/gradient_coherence" not in tags["scalars"]


def _many_classes(num_classes: int, per_class: int = 2, seed: int = 0):
    """Synthetic probe with many classes: stiffness of class-structured gradients for train-train, train-val and
    val-val (two train examples with a zero gradient: NaN rows and columns of cosine; the last class missing from
    val), and the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = {
        "train": torch.arange(num_classes).repeat_interleave(per_class),
        "val": torch.arange(num_classes - 1).repeat_interleave(per_class),
    }
    means = torch.randn(num_classes, 16, generator=g, dtype=torch.float64)
    grads = {k: means[y] + torch.randn(len(y), 16, generator=g, dtype=torch.float64) for k, y in labels.items()}
    grads["train"][[3, 10]] = 0.0
    stiffness = {}
    for pair, (r, c) in PAIRS.items():
        gram = grads[r] @ grads[c].T
        stiffness[pair] = {"cosine": cos64(grads[r], grads[c]), "sign": torch.sign(gram)}
    return stiffness, labels


def _drawn_class_means64(s, la, lb, same_set, w_a, w_b, num_classes):
    """Within/between of one draw by brute force in float64: the resampled examples repeated as drawn, every pair
    of two copies (copies of one example never paired within a set, non-finite stiffness left out), class means."""
    drawn_a = torch.repeat_interleave(torch.arange(len(la)), w_a.long())
    drawn_b = torch.repeat_interleave(torch.arange(len(lb)), w_b.long())
    pairs = s.double()[drawn_a][:, drawn_b]
    valid = torch.isfinite(pairs)
    if same_set:
        valid &= drawn_a[:, None] != drawn_b[None, :]
    key = (la[drawn_a][:, None] * num_classes + lb[drawn_b][None, :])[valid]
    sums = torch.bincount(key, weights=pairs[valid], minlength=num_classes**2).view(num_classes, num_classes)
    counts = torch.bincount(key, minlength=num_classes**2).view(num_classes, num_classes).double()
    return within_between64(torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan))


def _close_or_both_nan(got: float, want: float, tol: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or abs(got - want) <= tol


def test_300_classes_draws_and_intervals_equal_float64_brute_force_on_a_subsample_of_draws():
    """300 classes x 2: each draw's within/between (both kinds, every pair) equals the float64 measure of the
    resampled examples to 1e-12, on every 20th of 200 draws; and the intervals of those draws are their percentiles."""
    from lightning_stiffness.measures.intervals import _class_draws

    num_classes = 300
    stiffness, labels = _many_classes(num_classes)
    weights = draw_weights(labels, 200, torch.Generator().manual_seed(4))
    weights_are_within_class_resamples(weights, labels)
    subsample = {name: w[::20] for name, w in weights.items()}
    kinds = ("cosine", "sign")
    found = bootstrap_intervals(stiffness, {}, labels, kinds, "cosine", num_classes, 10, None, weights=subsample)
    for pair, (r, c) in PAIRS.items():
        got = _class_draws(stiffness[pair], pair, kinds, labels[r], labels[c], weights[r], weights[c], num_classes)
        for kind in kinds:
            expected = [
                _drawn_class_means64(
                    stiffness[pair][kind], labels[r], labels[c], r == c, weights[r][b], weights[c][b], num_classes
                )
                for b in range(0, 200, 20)
            ]
            for index, side in enumerate(SIDES):
                want = [e[index] for e in expected]
                for b, value in zip(range(0, 200, 20), want, strict=True):
                    assert _close_or_both_nan(float(got[kind][index][b]), value, 1e-12), (pair, kind, side, b)
                low, high = found.classes[pair][kind][side]
                want_low, want_high = percentile64(want)
                assert _close_or_both_nan(low, want_low, 1e-12) and _close_or_both_nan(high, want_high, 1e-12)


class _LargestTensor(TorchDispatchMode):
    """The bytes of the largest dense tensor any operation returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


@pytest.mark.parametrize("scattered_nan", [False, True])
def test_1000_classes_intervals_keep_memory_bounded(monkeypatch, scattered_nan):
    """1000 classes x 2 (2000 + 2000 examples): no tensor beyond a few [N, M] matrices, whatever C. With NaN at
    scattered pairs (the class matrices needed whole) under a small chunk setting, the draws go one at a time."""
    from lightning_stiffness.measures import intervals

    num_classes = 1000
    stiffness, labels = _many_classes(num_classes, seed=1)
    stiffness = {"train-val": stiffness["train-val"]}
    if scattered_nan:
        stiffness["train-val"]["cosine"][5, 7] = math.nan
        monkeypatch.setattr(intervals, "CLASS_CHUNK_BYTES", 2**20)
    weights = draw_weights(labels, 3 if scattered_nan else 40, torch.Generator().manual_seed(0))
    num_draws = next(iter(weights.values())).shape[0]
    matrix_bytes = 2000 * 1999 * 8
    with _LargestTensor() as watch:
        found = bootstrap_intervals(
            stiffness, {}, labels, ("cosine",), "cosine", num_classes, num_draws, None, weights=weights
        )
    # The former [K, C, B, C] float32 sums alone were 2 * 1000 * 40 * 1000 * 4 bytes = 320 MB here.
    assert watch.largest <= 2 * matrix_bytes, watch.largest
    for side in SIDES:
        low, high = found.classes["train-val"]["cosine"][side]
        assert math.isfinite(low) and low <= high
    if scattered_nan:  # the chunked path: each draw against the brute force
        w_r, w_c = weights["train"], weights["val"]
        s = stiffness["train-val"]["cosine"]
        draws = [
            _drawn_class_means64(s, labels["train"], labels["val"], False, w_r[b], w_c[b], num_classes)
            for b in range(3)
        ]
        for index, side in enumerate(SIDES):
            want = percentile64([d[index] for d in draws])
            got = found.classes["train-val"]["cosine"][side]
            assert got == pytest.approx(want, abs=1e-12)
