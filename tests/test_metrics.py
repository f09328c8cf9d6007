"""The torchmetrics metrics: any split of a Gram matrix into blocks gives the functional result on the whole."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_stiffness.functional import (
    class_stiffness,
    cosine_stiffness,
    critical_distance,
    distance_bin_edges,
    sign_stiffness,
    stiffness_by_distance,
)
from lightning_stiffness.measures.metrics import ClassStiffness, StiffnessByDistance


def _problem(seed, n, m, same):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    b = a if same else torch.randn(m, 5, generator=gen, dtype=torch.float64)
    if n > 2:
        a[1] = 0.0  # a zero gradient: NaN cosine stiffness, left out everywhere
    gram = a @ b.T
    labels = torch.randint(0, 3, (n,), generator=gen)
    labels2 = labels if same else torch.randint(0, 3, (b.shape[0],), generator=gen)
    distances = torch.rand(n, b.shape[0], generator=gen, dtype=torch.float64) * 2
    if same:
        distances = (distances + distances.T) / 2
    return gram, (a * a).sum(1), (b * b).sum(1), labels, labels2, distances, gen


def _splits(n, gen):
    cuts = sorted(torch.randperm(n + 1, generator=gen)[: int(torch.randint(1, 4, (1,), generator=gen))].tolist())
    edges = [0, *[c for c in cuts if 0 < c < n], n]
    return [slice(s, e) for s, e in itertools.pairwise(edges)]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 9),
    m=st.integers(1, 7),
    same=st.booleans(),
    kind=st.sampled_from(["cosine", "sign"]),
)
def test_class_stiffness_over_random_blocks_equals_functional(seed, n, m, same, kind):
    gram, norms, norms2, labels, labels2, _, gen = _problem(seed, n, m, same)
    stiffness = cosine_stiffness(gram, norms, norms2) if kind == "cosine" else sign_stiffness(gram)
    expected = class_stiffness(stiffness, labels, None if same else labels2, num_classes=3)
    metric = ClassStiffness(num_classes=3, kind=kind)
    ids, ids2 = torch.arange(n), torch.arange(gram.shape[1])
    for rows in _splits(n, gen):
        for cols in _splits(gram.shape[1], gen):
            metric.update(
                gram[rows, cols],
                labels[rows],
                labels2[cols],
                norms[rows],
                norms2[cols],
                ids[rows] if same else None,
                ids2[cols] if same else None,
            )
    torch.testing.assert_close(metric.compute(), expected, equal_nan=True, atol=1e-6, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000), n=st.integers(2, 9), m=st.integers(1, 7), same=st.booleans(), bins=st.integers(1, 6)
)
def test_stiffness_by_distance_over_random_blocks_equals_functional(seed, n, m, same, bins):
    gram, norms, norms2, labels, labels2, distances, gen = _problem(seed, n, m, same)
    stiffness = cosine_stiffness(gram, norms, norms2)
    same_class = labels[:, None] == labels2[None, :]
    if same:
        same_class &= ~torch.eye(n, dtype=torch.bool)
    edges = distance_bin_edges(distances, bins=bins)
    expected_curve = stiffness_by_distance(stiffness, distances, same_class, bins=edges)
    expected_xi = critical_distance(stiffness, distances, same_class)
    metric = StiffnessByDistance(edges, kind="cosine")
    ids, ids2 = torch.arange(n), torch.arange(gram.shape[1])
    for rows in _splits(n, gen):
        block_mask = labels[rows][:, None] == labels2[None, :]
        metric.update(
            gram[rows],
            distances[rows],
            norms[rows],
            norms2,
            ids[rows] if same else None,
            ids2 if same else None,
            mask=block_mask,
        )
    curve, xi = metric.compute()
    torch.testing.assert_close(curve.edges, expected_curve.edges)
    assert curve.count.tolist() == expected_curve.count.tolist()
    torch.testing.assert_close(curve.mean, expected_curve.mean, equal_nan=True, atol=1e-6, rtol=1e-6)
    assert (math.isnan(xi) and math.isnan(expected_xi)) or xi == pytest.approx(expected_xi, rel=1e-6, abs=1e-9)


def test_reset_and_bad_arguments():
    metric = ClassStiffness(num_classes=2, kind="sign")
    metric.update(torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([0, 1]))
    metric.reset()
    assert torch.isnan(metric.compute()).all()
    with pytest.raises(ValueError, match="`num_classes` must be a positive integer"):
        ClassStiffness(num_classes=0)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        ClassStiffness(num_classes=2, kind="euclid")
    with pytest.raises(ValueError, match="`edges` must be a 1-D increasing"):
        StiffnessByDistance(edges=[1.0, 0.0])
    with pytest.raises(ValueError, match="cosine stiffness needs `sq_norms`"):
        ClassStiffness(num_classes=2).update(torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([0, 1]))


def _gather_twice(tensor, group=None):
    """A stand-in for torchmetrics' all-gather over two processes that hold the same states."""
    return [tensor, tensor]


def _shapes(metric):
    out = metric.compute()
    if isinstance(out, tuple):
        curve, xi = out
        return [tuple(curve.edges.shape), tuple(curve.mean.shape), tuple(curve.count.shape), type(xi)]
    return tuple(out.shape)


@pytest.mark.parametrize(
    "make, update, expected",
    [
        (
            lambda **kw: ClassStiffness(num_classes=1, kind="sign", **kw),
            lambda m: m.update(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
            (1, 1),
        ),
        (
            lambda **kw: StiffnessByDistance(edges=[0.0, 1.0], kind="sign", **kw),
            lambda m: m.update(torch.ones(1, 1), torch.full((1, 1), 0.5)),
            [(2,), (1,), (1,), float],
        ),
    ],
)
def test_one_element_results_keep_their_shape_through_clone_pickle_and_sync(make, update, expected):
    import pickle

    metric = make()
    update(metric)
    assert _shapes(metric) == expected
    assert _shapes(metric.clone()) == expected
    assert _shapes(pickle.loads(pickle.dumps(metric))) == expected
    fresh = make()
    update(fresh)
    assert _shapes(fresh.clone()) == expected  # cloned before compute() ran
    synced = make(dist_sync_fn=_gather_twice, distributed_available_fn=lambda: True)
    update(synced)
    assert _shapes(synced) == expected
    assert _shapes(synced.clone()) == expected
