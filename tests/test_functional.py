"""The stiffness measures against direct loops, with property tests for the small pure functions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_stiffness.functional import (
    class_stiffness,
    cosine_stiffness,
    critical_distance,
    pairwise_distances,
    sign_stiffness,
    stiffness_by_distance,
    within_between,
)

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _gradients(n, p, seed):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cosine_matches_loop_and_zero_gradient_is_nan():
    g = _gradients(6, 5, 0)
    g[3] = 0.0
    got = cosine_stiffness(g @ g.T)
    for i in range(6):
        for j in range(6):
            if i == 3 or j == 3:
                assert math.isnan(got[i, j])
            else:
                expected = torch.dot(g[i], g[j]) / (g[i].norm() * g[j].norm())
                assert got[i, j] == pytest.approx(float(expected), abs=1e-12)
    assert not torch.isinf(got).any()


def test_cosine_cross_gram_needs_and_uses_norms():
    a, b = _gradients(4, 5, 1), _gradients(3, 5, 2)
    got = cosine_stiffness(a @ b.T, (a * a).sum(1), (b * b).sum(1))
    expected = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="`sq_norms` is required for a non-square `gram`"):
        cosine_stiffness(a @ b.T)
    with pytest.raises(ValueError, match="`sq_norms2` must be a 1-D tensor with one entry per column"):
        cosine_stiffness(a @ b.T, (a * a).sum(1), (a * a).sum(1))


def test_sign_is_float():
    gram = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    torch.testing.assert_close(sign_stiffness(gram), torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    assert sign_stiffness(torch.tensor([[1, -2]])).is_floating_point()


def _class_matrix_loop(s, labels, labels2, num_classes, same_set):
    sums = [[0.0] * num_classes for _ in range(num_classes)]
    counts = [[0] * num_classes for _ in range(num_classes)]
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            if (same_set and i == j) or not math.isfinite(float(s[i, j])):
                continue
            sums[labels[i]][labels2[j]] += float(s[i, j])
            counts[labels[i]][labels2[j]] += 1
    return [
        [sums[a][b] / counts[a][b] if counts[a][b] else math.nan for b in range(num_classes)]
        for a in range(num_classes)
    ]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 9), num_classes=st.integers(1, 4), seed=seeds, same=st.booleans())
def test_class_stiffness_matches_loop(n, m, num_classes, seed, same):
    gen = torch.Generator().manual_seed(seed)
    m = n if same else m
    s = torch.rand(n, m, generator=gen, dtype=torch.float64) * 2 - 1
    s[torch.rand(n, m, generator=gen) < 0.1] = float("nan")
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    labels2 = labels if same else torch.randint(0, num_classes, (m,), generator=gen)
    got = class_stiffness(s, labels, None if same else labels2, num_classes=num_classes)
    expected = torch.tensor(
        _class_matrix_loop(s, labels.tolist(), labels2.tolist(), num_classes, same), dtype=torch.float64
    )
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_class_stiffness_excludes_self_pairs_and_marks_missing_pairs():
    s = torch.eye(3, dtype=torch.float64)  # self-stiffness 1 everywhere it is excluded
    labels = torch.tensor([0, 0, 1])
    got = class_stiffness(s, labels, num_classes=3)
    assert got[0, 0] == 0.0
    assert math.isnan(got[1, 1])  # the only class-1 pair is a self pair
    assert math.isnan(got[2, 2]) and math.isnan(got[0, 2])


@pytest.mark.parametrize(
    "labels, kwargs, message",
    [
        (torch.tensor([0, 1, 3]), {"num_classes": 3}, r"must lie in \[0, 3\), got values in \[0, 3\]"),
        (torch.tensor([0, -1, 1]), {}, r"must lie in \[0, 2\)"),
        (torch.tensor([0.0, 1.0, 1.0]), {}, "must hold integer class indices"),
        (torch.tensor([0, 1]), {}, r"`labels` must be a 1-D tensor with one entry per example \(3\)"),
        (torch.tensor([0, 1, 1]), {"num_classes": 0}, "`num_classes` must be a positive integer"),
    ],
)
def test_class_stiffness_bad_labels(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_stiffness(torch.zeros(3, 3), labels, **kwargs)


def test_class_stiffness_cross_needs_labels2():
    with pytest.raises(ValueError, match="`labels2` is required for a non-square `stiffness`"):
        class_stiffness(torch.zeros(3, 2), torch.tensor([0, 1, 1]))


def test_within_between_ignore_nan():
    c = torch.tensor([[1.0, 0.2, float("nan")], [0.4, float("nan"), 0.0], [0.0, 0.0, 0.5]])
    within, between = within_between(c)
    assert within == pytest.approx(0.75)
    assert between == pytest.approx(0.6 / 5)
    assert math.isnan(within_between(torch.tensor([[0.3]]))[1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 5), seed=seeds)
def test_cosine_distances_symmetric_in_range_and_match_loop(n, d, seed):
    x = _gradients(n, d, seed)
    dist = pairwise_distances(x)
    assert torch.equal(dist, dist.T) or torch.allclose(dist, dist.T, atol=1e-12)
    assert bool(((dist >= 0) & (dist <= 2)).all())
    assert bool((torch.diagonal(dist) == 0).all())
    for i in range(n):
        for j in range(n):
            if i != j:
                expected = 1 - float(torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm()))
                assert float(dist[i, j]) == pytest.approx(expected, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), seed=seeds)
def test_euclidean_distances_match_loop(n, m, seed):
    a, b = _gradients(n, 4, seed).reshape(n, 2, 2), _gradients(m, 4, seed + 1).reshape(m, 2, 2)
    dist = pairwise_distances(a, b, metric="euclidean")
    expected = torch.tensor([[float((a[i] - b[j]).norm()) for j in range(m)] for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(dist, expected)


def test_cosine_distance_of_zero_vector_is_nan_and_bad_args():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    dist = pairwise_distances(x)
    assert math.isnan(dist[0, 1]) and math.isnan(dist[1, 1]) and dist[0, 0] == 0
    with pytest.raises(ValueError, match=r"`metric` must be one of \['cosine', 'euclidean'\]"):
        pairwise_distances(x, metric="manhattan")
    with pytest.raises(ValueError, match="same number of features"):
        pairwise_distances(x, torch.zeros(2, 3))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 8), bins=st.integers(1, 6), seed=seeds, binning=st.sampled_from(["width", "quantile"]))
def test_stiffness_by_distance_matches_loop(n, bins, seed, binning):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, n, generator=gen, dtype=torch.float64) * 2 - 1
    d = torch.rand(n, n, generator=gen, dtype=torch.float64) * 2
    curve = stiffness_by_distance(s, d, bins=bins, binning=binning)
    edges = curve.edges.tolist()
    assert len(edges) == bins + 1 and edges == sorted(edges)
    assert int(curve.count.sum()) == n * n - n  # every off-diagonal pair lands in exactly one bin
    for k in range(bins):
        if curve.count[k] == 0:
            assert math.isnan(curve.mean[k])
    # the per-bin means reproduce the overall mean
    total = sum(float(curve.mean[k] * curve.count[k]) for k in range(bins) if curve.count[k] > 0)
    off = ~torch.eye(n, dtype=torch.bool)
    assert total == pytest.approx(float(s[off].sum()), abs=1e-9)


def test_stiffness_by_distance_explicit_edges_and_mask():
    s = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, -1.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.1, 0.6], [0.1, 0.0, 1.5], [0.6, 1.5, 0.0]], dtype=torch.float64)
    curve = stiffness_by_distance(s, d, bins=torch.tensor([0.0, 0.5, 1.0]))
    assert curve.count.tolist() == [2, 2]  # the 1.5 pairs fall outside the edges
    torch.testing.assert_close(curve.mean, torch.tensor([1.0, 0.5], dtype=torch.float64))
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    assert stiffness_by_distance(s, d, mask=mask, bins=torch.tensor([0.0, 0.5, 1.0])).count.tolist() == [1, 0]


def test_quantile_bins_hold_equal_counts():
    d = torch.arange(100, dtype=torch.float64).reshape(10, 10)
    s = torch.zeros(10, 10, dtype=torch.float64)
    curve = stiffness_by_distance(s, d, mask=torch.ones(10, 10, dtype=torch.bool), bins=4, binning="quantile")
    assert curve.count.tolist() == [25, 25, 25, 25]


@settings(max_examples=40, deadline=None)
@given(xi=st.floats(0.1, 1.9), slope=st.floats(-5, -0.05), n=st.integers(3, 8), seed=seeds)
def test_critical_distance_of_a_known_line(xi, slope, n, seed):
    d = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    s = slope * (d - xi)
    assert critical_distance(s, d) == pytest.approx(xi, rel=1e-6, abs=1e-9)


def test_critical_distance_nan_when_not_decreasing_and_bad_shapes():
    d = torch.tensor([[0.0, 0.2, 0.4], [0.2, 0.0, 0.6], [0.4, 0.6, 0.0]], dtype=torch.float64)
    assert math.isnan(critical_distance(d.clone(), d))  # rising line
    assert math.isnan(critical_distance(torch.ones(3, 3), torch.ones(3, 3)))  # one distance only
    with pytest.raises(ValueError, match="`distances` must have the shape of `stiffness`"):
        critical_distance(torch.zeros(3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`mask` must be a boolean tensor of shape"):
        critical_distance(torch.zeros(3, 3), d, mask=torch.ones(3, 3))


def test_critical_distance_brute_force_least_squares():
    gen = torch.Generator().manual_seed(5)
    d = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    s = 0.8 - 1.3 * d + 0.1 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    off = ~torch.eye(6, dtype=torch.bool)
    design = torch.stack([torch.ones(30, dtype=torch.float64), d[off]], dim=1)
    a, b = torch.linalg.lstsq(design, s[off].unsqueeze(1)).solution.flatten().tolist()
    assert critical_distance(s, d) == pytest.approx(-a / b, rel=1e-9)
