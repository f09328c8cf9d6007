"""Class groups (against loops over pairs and over class-matrix entries), and gradient coherence and diversity
(against loops over per-example gradients), through the functions, the metric, a probe's result and its tags."""

import math

import numpy as np
import pytest
import torch

from lightning_stiffness.functional import (
    class_stiffness,
    cosine_stiffness,
    gradient_coherence,
    gradient_diversity,
)
from lightning_stiffness.measures.groups import (
    add_group_measures,
    check_class_groups,
    group_matrix,
    group_means,
    resolve_groups,
)
from lightning_stiffness.measures.metrics import GradientAlignment
from lightning_stiffness.measures.probe_measures import GramRows, measure_stiffness
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import gradient_coherence_tag, gradient_diversity_tag, group_tag
from tests.models import build, make_inputs
from tests.reference import reference_gradients


def test_resolve_groups_from_a_list_or_a_dict():
    from_list = resolve_groups(["animal", "thing", "animal", 7], 4)
    assert from_list.of_class.tolist() == [0, 1, 0, 2] and from_list.names == ["animal", "thing", "7"]
    from_dict = resolve_groups({"living": [0, 2], "non-living": [1, 3]}, 4)
    assert from_dict.of_class.tolist() == [0, 1, 0, 1] and from_dict.names == ["living", "non-living"]
    with pytest.raises(ValueError, match="each of the 4 classes"):
        resolve_groups([0, 1], 4)
    with pytest.raises(ValueError, match=r"classes \[3\] in no group"):
        resolve_groups({"a": [0, 1], "b": [2]}, 4)
    with pytest.raises(ValueError, match="places class 1 in two groups, 'a' and 'b'"):
        resolve_groups({"a": [0, 1], "b": [1, 2, 3]}, 4)
    with pytest.raises(ValueError, match=r"group 'a' names class 10, outside \[0, 4\)"):
        resolve_groups({"a": [0, 1, 10], "b": [2, 3]}, 4)
    with pytest.raises(ValueError, match=r"groups without classes: \['a'\]"):
        resolve_groups({"a": [], "b": [0, 1, 2, 3]}, 4)
    # NumPy integers (CIFAR-100's coarse labels usually are) and arrays as a dict's values
    coarse = np.array([0, 0, 1, 1])
    assert resolve_groups(list(coarse), 4).of_class.tolist() == [0, 0, 1, 1]
    assert resolve_groups({"a": coarse[:2] * 0 + np.arange(2), "b": np.arange(2, 4)}, 4).names == ["a", "b"]
    with pytest.raises(ValueError, match="class_groups"):
        check_class_groups("animals")


def _gradients(n=24, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(n // classes)
    grads = torch.randn(classes, 9, generator=generator, dtype=torch.float64)[labels] * 0.7
    return grads + torch.randn(n, 9, generator=generator, dtype=torch.float64), labels


def test_group_matrix_and_means_against_loops():
    grads, labels = _gradients()
    cos = cosine_stiffness(grads @ grads.T)
    groups = resolve_groups([0, 0, 1, 1], 4)
    got = group_matrix(cos, labels, None, groups)
    expected = torch.zeros(2, 2, dtype=torch.float64)
    counts = torch.zeros(2, 2)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j:
                g, h = int(groups.of_class[labels[i]]), int(groups.of_class[labels[j]])
                expected[g, h] += cos[i, j]
                counts[g, h] += 1
    assert torch.allclose(got, expected / counts)

    matrix = class_stiffness(cos, labels, num_classes=4)
    within_group = [matrix[a, b] for a in range(4) for b in range(4) if a != b and a // 2 == b // 2]
    between = [matrix[a, b] for a in range(4) for b in range(4) if a // 2 != b // 2]
    assert group_means(matrix, groups) == pytest.approx(
        (float(sum(within_group) / len(within_group)), float(sum(between) / len(between)))
    )
    # Two sets: every pair counts (no self-pairs to leave out).
    cross = cosine_stiffness(grads[:12] @ grads[12:].T, (grads[:12] ** 2).sum(1), (grads[12:] ** 2).sum(1))
    got = group_matrix(cross, labels[:12], labels[12:], groups)
    rows, cols = groups.of_class[labels[:12]], groups.of_class[labels[12:]]
    assert got[0, 1] == pytest.approx(float(cross[rows == 0][:, cols == 1].mean()))


def test_one_class_per_group_has_no_between_class_within_group():
    matrix = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
    within, between = group_means(matrix, resolve_groups([0, 1], 2))
    assert math.isnan(within) and between == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_coherence_and_diversity_against_per_example_gradients(name):
    model = build(name)
    x, y = make_inputs(name, 7, torch.Generator().manual_seed(1))
    g = reference_gradients(model, x, y)
    n = len(g)
    # Chatterjee and Zielinski's alpha: E[g_i . g_j] over i, j drawn independently from the set (i = j included).
    pairs = [float(g[i] @ g[j]) for i in range(n) for j in range(n)]
    mean_square = float((g * g).sum(dim=1).mean())
    gram = g @ g.T
    assert gradient_coherence(gram) == pytest.approx(sum(pairs) / len(pairs) / mean_square, rel=1e-10)
    assert gradient_diversity(gram) == pytest.approx(float((g * g).sum()) / float(g.sum(0) @ g.sum(0)), rel=1e-10)
    # The relation between the two (m-coherence n * alpha = 1 / diversity), and their extremes.
    assert 1 / gradient_diversity(gram) == pytest.approx(n * gradient_coherence(gram))
    same = torch.ones(3, 3)
    assert gradient_coherence(same) == pytest.approx(1.0) and gradient_diversity(same) == pytest.approx(1 / 3)
    assert gradient_coherence(torch.eye(3)) == pytest.approx(1 / 3)  # orthogonal: alpha_perp = 1 / n
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # g and -g
    assert gradient_coherence(opposite) == 0.0 and gradient_diversity(opposite) == math.inf
    assert math.isnan(gradient_coherence(torch.zeros(3, 3))) and math.isnan(gradient_diversity(torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="square"):
        gradient_coherence(torch.ones(2, 3))


def test_metric_over_blocks_and_the_result_tags():
    grads, labels = _gradients()
    gram = grads @ grads.T
    metric = GradientAlignment()
    for rows in (slice(0, 5), slice(5, 24)):
        metric.update(gram[rows], gram.diagonal()[rows])
    assert metric.compute() == pytest.approx((gradient_coherence(gram), gradient_diversity(gram)))

    x = torch.randn(24, 5, dtype=torch.float64)
    sets = {"train": x[:12], "val": x[12:]}
    labels_by_set = {"train": labels[:12], "val": labels[12:]}
    kwargs = dict(num_classes=4, kinds=("cosine", "sign"))
    whole = measure_stiffness(gram, sets, labels_by_set, labels_by_set, **kwargs)
    # Rows split as two processes would hold them: the same coherence (the metric adds the blocks).
    rows = GramRows(gram[:12], torch.arange(12), gram.diagonal())
    split = measure_stiffness(rows, sets, labels_by_set, labels_by_set, full_gram=gram, **kwargs)
    for name in ("train", "val"):
        block = gram[:12, :12] if name == "train" else gram[12:, 12:]
        assert whole.gradient_coherence[name] == pytest.approx(gradient_coherence(block))
        assert whole.gradient_diversity[name] == pytest.approx(gradient_diversity(block))
        scalars = whole.scalars()
        assert scalars[gradient_coherence_tag(name)] == whole.gradient_coherence[name]
        assert scalars[gradient_diversity_tag(name)] == whole.gradient_diversity[name]
    assert split.gradient_coherence["train"] == pytest.approx(whole.gradient_coherence["train"])

    add_group_measures(whole, {"first": [0, 1], "second": [2, 3]})
    assert whole.group_names == ["first", "second"]
    assert whole.group_matrices["train-val/sign"].shape == (2, 2)
    scalars = whole.scalars(prefix="p")
    assert group_tag("val-val", "cosine", "between_groups", "p") in scalars
    assert group_tag("train-train", "sign", "between_class_within_group", "p") in scalars
    again = StiffnessResult.from_dict(whole.to_dict())
    assert torch.equal(again.group_matrices["train-train/cosine"], whole.group_matrices["train-train/cosine"])
    assert again.gradient_coherence == whole.gradient_coherence


def test_group_matrix_image_is_drawn():
    from lightning_stiffness.images.specs import probe_images
    from lightning_stiffness.names import group_matrix_tag

    grads, labels = _gradients()
    gram = grads @ grads.T
    x = torch.randn(24, 5, dtype=torch.float64)
    sets, by_set = {"train": x[:12], "val": x[12:]}, {"train": labels[:12], "val": labels[12:]}
    result = measure_stiffness(gram, sets, by_set, by_set, num_classes=4, kinds=("cosine",))
    add_group_measures(result, ["a", "a", "b", "b"])
    images = probe_images(result, ["0", "1", "2", "3"])
    for pair in ("train-train", "train-val", "val-val"):
        image = images[group_matrix_tag(pair, "cosine")]
        assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


def test_groups_without_the_stiffness_matrices_are_refused():
    grads, labels = _gradients()
    gram = grads @ grads.T
    rows = GramRows(gram, torch.arange(24), gram.diagonal())  # no whole Gram matrix: no stiffness matrices kept
    result = measure_stiffness(rows, {"train": torch.randn(24, 5)}, {"train": labels}, {"train": labels}, num_classes=4)
    with pytest.raises(ValueError, match="class groups need the train-train cosine stiffness and class matrices"):
        add_group_measures(result, ["a", "a", "b", "b"])
