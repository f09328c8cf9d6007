"""Bootstrap bands around the distance curves: each bin's ends equal a brute-force loop over draws and pairs with the
same weights; a constant population gives no width; bands shrink as the probe grows; they survive the raw files and
come out of a real run for every curve."""

import io
import math

import torch
from lightning.pytorch import seed_everything

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import cosine_stiffness, distance_bin_edges, pairwise_distances
from lightning_stiffness.measures.functional import DistanceCurve
from lightning_stiffness.measures.intervals import (
    bin_mean_draws,
    bootstrap_intervals,
    curve_bands,
    draw_weights,
    percentile_interval,
)
from lightning_stiffness.measures.records import DistanceMeasures
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT, PAIRS
from tests.helpers import FIXTURE_V1, DigitsData, TinyNet, raw_results, trainer


def _brute_force_band(values, distances, edges, labels_r, labels_c, w_rows, w_cols, same_set):
    """Per side and bin: the percentile interval of the draws' weighted means, looping over draws and pairs."""
    num_bins = len(edges) - 1
    edges = [float(e) for e in edges]
    means = torch.full((w_rows.shape[0], 2, num_bins), math.nan, dtype=torch.float64)
    for draw in range(w_rows.shape[0]):
        num = [[0.0] * num_bins for _ in range(2)]
        den = [[0.0] * num_bins for _ in range(2)]
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                s, x = float(values[i, j]), float(distances[i, j])
                if (same_set and i == j) or not math.isfinite(s) or not edges[0] <= x <= edges[-1]:
                    continue
                k = next(k for k in range(num_bins) if x < edges[k + 1] or k == num_bins - 1)
                side = int(labels_r[i] != labels_c[j])
                weight = float(w_rows[draw, i]) * float(w_cols[draw, j])
                num[side][k] += weight * s
                den[side][k] += weight
        for side in range(2):
            for k in range(num_bins):
                if den[side][k] > 0:
                    means[draw, side, k] = num[side][k] / den[side][k]
    ends = [[percentile_interval(means[:, side, k]) for k in range(num_bins)] for side in range(2)]
    return means, torch.tensor(ends, dtype=torch.float64)  # [B, 2, bins], [2, bins, 2]


def _small_probe(seed: int = 0):
    """Train (14) and val (11) examples of 3 classes, every pair of sets; gradients with class structure; distances
    with a gap (an empty bin), pairs on and just below edges, and one example with no gradient (NaN stiffness).
    Stiffness by pair and kind, distances and edges by pair and space (input, and ``layer`` of train-train)."""
    generator = torch.Generator().manual_seed(seed)
    labels = {"train": torch.tensor([0] * 5 + [1] * 4 + [2] * 5), "val": torch.tensor([0] * 4 + [1] * 4 + [2] * 3)}
    means = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    grads = {k: means[y] + torch.randn(len(y), 6, generator=generator, dtype=torch.float64) for k, y in labels.items()}
    grads["train"][3] = 0.0  # no direction: its cosine stiffness is NaN, left out of every curve
    stiffness, distances, edges = {}, {}, {}
    for pair, (rows, cols) in PAIRS.items():
        a, b = grads[rows], grads[cols]
        stiffness[pair] = {"cosine": cosine_stiffness(a @ b.T, (a * a).sum(1), (b * b).sum(1))}
        near = torch.rand(len(a), len(b), generator=generator, dtype=torch.float64) * 0.3
        far = 0.7 + torch.rand(len(a), len(b), generator=generator, dtype=torch.float64) * 0.3
        space = torch.where(torch.rand(len(a), len(b), generator=generator) < 0.5, near, far)
        if rows == cols:
            space = space.triu(1) + space.triu(1).T
        mask = ~torch.eye(len(a), len(b), dtype=torch.bool) if rows == cols else None
        edges[pair] = {INPUT: distance_bin_edges(space, mask, 5)}
        # On an edge (in the upper bin) and a hair below one; within a set, (i, j) and (j, i) then differ.
        for (i, j), edge, below in (((1, 6), 1, False), ((2, 7), 1, True), ((4, 8), 4, False), ((5, 9), 4, True)):
            value = edges[pair][INPUT][edge]
            space[i, j] = torch.nextafter(value, value - 1) if below else value
        distances[pair] = {INPUT: space}
    # A layer's distances binned by quantiles (edges of unequal width).
    layer = distances["train-train"][INPUT] * 3
    edges["train-train"]["layer"] = distance_bin_edges(layer, None, 4, binning="quantile")
    distances["train-train"]["layer"] = layer
    return stiffness, distances, edges, labels


def test_bands_equal_a_brute_force_loop_over_draws_and_pairs():
    stiffness, distances, edges, labels = _small_probe()
    weights = draw_weights(labels, 60, torch.Generator().manual_seed(4))
    bands = curve_bands(stiffness, distances, edges, labels, "cosine", weights)
    assert {p: set(s) for p, s in bands.items()} == {p: set(s) for p, s in distances.items()}
    for pair, by_space in distances.items():
        rows, cols = pair.split("-")
        for space, matrix in by_space.items():
            args = (stiffness[pair]["cosine"], matrix, edges[pair][space], labels[rows], labels[cols])
            args += (weights[rows], weights[cols], rows == cols)
            draws, expected = _brute_force_band(*args)
            torch.testing.assert_close(bin_mean_draws(*args), draws, atol=1e-6, rtol=0, equal_nan=True)
            for index, side in enumerate(("within", "between")):
                low, high = bands[pair][space][side]
                assert low.dtype == torch.float64 and low.shape == (len(edges[pair][space]) - 1,)
                torch.testing.assert_close(low, expected[index, :, 0], atol=1e-6, rtol=0, equal_nan=True)
                torch.testing.assert_close(high, expected[index, :, 1], atol=1e-6, rtol=0, equal_nan=True)
    # The gap between 0.3 and 0.7 leaves the middle input-space bin empty: NaN ends on both sides.
    for pair in ("train-train", "train-val"):
        for side in ("within", "between"):
            assert torch.isnan(torch.stack(bands[pair][INPUT][side])[:, 2]).all()
            assert torch.isfinite(torch.stack(bands[pair][INPUT][side])[:, [0, 4]]).all()


def test_one_set_of_draws_serves_the_intervals_and_the_bands():
    stiffness, distances, _, labels = _small_probe()
    args = (stiffness, distances, labels, ("cosine",), "cosine", 3, 40)
    drawn_here = bootstrap_intervals(*args, torch.Generator().manual_seed(9))
    weights = draw_weights(labels, 40, torch.Generator().manual_seed(9))
    assert bootstrap_intervals(*args, None, weights=weights) == drawn_here


def test_constant_stiffness_gives_a_zero_width_band():
    generator = torch.Generator().manual_seed(1)
    labels = {"train": torch.arange(4).repeat_interleave(6)}
    distances = {"train-train": {INPUT: pairwise_distances(torch.randn(24, 5, generator=generator))}}
    stiffness = {"train-train": {"cosine": torch.full((24, 24), 0.5)}}
    mask = ~torch.eye(24, dtype=torch.bool)
    edges = {"train-train": {INPUT: distance_bin_edges(distances["train-train"][INPUT], mask, 6)}}
    weights = draw_weights(labels, 100, generator)
    bands = curve_bands(stiffness, distances, edges, labels, "cosine", weights)["train-train"][INPUT]
    for low, high in bands.values():
        filled = ~torch.isnan(low)
        assert filled.any() and torch.equal(low[filled], high[filled])
        assert torch.all(low[filled] == 0.5)


def _population(classes: int = 3, per_class: int = 300, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 12, generator=generator, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    grads = means[labels] * 0.6 + torch.randn(len(labels), 12, generator=generator, dtype=torch.float64)
    inputs = means[labels, :4] + torch.randn(len(labels), 4, generator=generator, dtype=torch.float64)
    return grads, inputs, labels


def test_bands_shrink_as_examples_per_class_grow():
    grads, inputs, labels = _population()
    edges = {"train-train": {INPUT: torch.linspace(0, 2, 5, dtype=torch.float64)}}
    widths = {}
    for per_class in (8, 64):
        generator = torch.Generator().manual_seed(7)
        total, bins = 0.0, 0
        for _ in range(6):
            picks = torch.cat([c * 300 + torch.randperm(300, generator=generator)[:per_class] for c in range(3)])
            g, y = grads[picks], labels[picks]
            stiffness = {"train-train": {"cosine": cosine_stiffness(g @ g.T)}}
            distances = {"train-train": {INPUT: pairwise_distances(inputs[picks])}}
            weights = draw_weights({"train": y}, 100, generator)
            bands = curve_bands(stiffness, distances, edges, {"train": y}, "cosine", weights)["train-train"][INPUT]
            for low, high in bands.values():
                width = (high - low)[torch.isfinite(high - low)]
                total, bins = total + float(width.sum()), bins + width.numel()
        widths[per_class] = total / bins
    assert widths[64] < widths[8] / 2, widths


def test_round_trip_through_the_raw_dict_and_old_files_load():
    band = (torch.tensor([0.1, math.nan], dtype=torch.float64), torch.tensor([0.3, math.nan], dtype=torch.float64))
    curve = DistanceCurve(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.2, math.nan]), torch.tensor([3, 0]))

    def space(bands):
        return DistanceMeasures(torch.zeros(2, 2), {"within": curve, "between": curve}, 0.7, bands=bands)

    result = StiffnessResult(
        epoch=0, step=3, kinds=("cosine",), xi_kind="cosine", num_classes=2,
        labels={"train": torch.tensor([0, 1])}, indices={"train": torch.tensor([5, 9])},
        spaces={"train-train": {INPUT: space({"within": band, "between": band}), "net.1": space({"within": band})}},
    )  # fmt: skip
    buffer = io.BytesIO()
    torch.save(result.to_dict(), buffer)
    buffer.seek(0)
    loaded = StiffnessResult.from_dict(torch.load(buffer, weights_only=True))
    assert set(loaded.spaces["train-train"]) == {INPUT, "net.1"}
    for name, measures in result.spaces["train-train"].items():
        assert set(loaded.spaces["train-train"][name].bands) == set(measures.bands)
        for side, (low, high) in measures.bands.items():
            got = loaded.spaces["train-train"][name].bands[side]
            assert isinstance(got, tuple)
            torch.testing.assert_close(got[0], low, equal_nan=True)
            torch.testing.assert_close(got[1], high, equal_nan=True)
    # A version-1 file written before the bands: every space loads without them.
    old = torch.load(FIXTURE_V1, weights_only=True)
    del old["curve_intervals"]
    assert all(not m.bands for by_space in StiffnessResult.from_dict(old).spaces.values() for m in by_space.values())


def test_a_run_saves_a_band_for_every_curve(tmp_path):
    seed_everything(0)
    callback = StiffnessCallback(samples_per_class=3, layers=["net.1"], num_bootstrap=50, log_images=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(TinyNet(), datamodule=DigitsData())
    raw = raw_results(next(tmp_path.glob("lightning_logs/version_*")))
    assert raw
    for data in raw.values():
        result = StiffnessResult.from_dict(data)
        assert {p: list(s) for p, s in result.spaces.items()} == {p: [INPUT, "net.1"] for p in result.pairs}
        for by_space in result.spaces.values():
            for measures in by_space.values():
                assert set(measures.bands) == {"within", "between"}
                for side, curve in measures.curves.items():
                    low, high = measures.bands[side]
                    assert low.shape == high.shape == curve.mean.shape and low.dtype == torch.float64
                    # NaN ends exactly where the probe's bin is empty (50 draws all missing a filled bin: negligible).
                    assert torch.equal(torch.isnan(low), curve.count == 0)
                    assert torch.equal(torch.isnan(high), curve.count == 0)
                    assert torch.all(low[curve.count > 0] <= high[curve.count > 0])
