"""Class groups (against loops over pairs and over class-matrix entries), and gradient coherence and diversity
(against loops over per-example gradients), through the functions, the metric, a probe's result and its tags."""

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import (
    class_stiffness,
    cosine_stiffness,
    gradient_coherence,
    gradient_diversity,
)
from lightning_stiffness.images.specs import probe_images
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
from lightning_stiffness.names import gradient_coherence_tag, gradient_diversity_tag, group_matrix_tag, group_tag
from tests.helpers import GROUPS, Data, Net, digits_sets, events, fit, probe_reference, probe_results, trainer
from tests.models.basic import build, make_inputs
from tests.reference import PAIRS, class_matrix_loop, reference_gradients


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
    assert whole.groups["train-val"]["sign"].matrix.shape == (2, 2)
    scalars = whole.scalars(prefix="p")
    assert group_tag("val-val", "cosine", "between_groups", "p") in scalars
    assert group_tag("train-train", "sign", "between_class_within_group", "p") in scalars
    again = StiffnessResult.from_dict(whole.to_dict())
    assert torch.equal(again.groups["train-train"]["cosine"].matrix, whole.groups["train-train"]["cosine"].matrix)
    assert again.gradient_coherence == whole.gradient_coherence


def test_group_matrix_image_is_drawn():
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


def test_group_matrix_and_scalars_against_loops(tmp_path):
    train, val = digits_sets(None, {7: 0})
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, class_groups=GROUPS, num_bootstrap=0, every_n_epochs=0)
    t, snaps = fit(tmp_path, Net(), data, cb)
    (result,) = probe_results(t).values()
    _, cos, _, _ = probe_reference({}, snaps.states[result.step], result, data)
    of_class = torch.zeros(10, dtype=torch.long)
    for gi, classes in enumerate(GROUPS.values()):
        of_class[classes] = gi
    assert result.group_names == list(GROUPS)
    acc = events(t.log_dir)
    for pair, (r, c) in PAIRS.items():
        la, lb = result.labels[r], result.labels[c]
        sign = torch.sign(cos[pair])  # sign of g_i . g_j
        for kind, s in (("cosine", cos[pair]), ("sign", sign)):
            # Group matrix: mean over pairs of examples (i != j), by group, in a plain loop.
            sums, counts = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
            for i in range(len(la)):
                for j in range(len(lb)):
                    if (r == c and i == j) or not math.isfinite(float(s[i, j])):
                        continue
                    gi, gj = of_class[la[i]], of_class[lb[j]]
                    sums[gi, gj] += s[i, j]
                    counts[gi, gj] += 1
            expected = torch.where(counts > 0, sums / counts, torch.full_like(sums, math.nan))
            got = result.groups[pair][kind].matrix.double()
            assert torch.allclose(got, expected, atol=1e-5, equal_nan=True), (pair, kind, got, expected)
            m = class_matrix_loop(s, la, lb, 10, r == c)
            same = of_class[:, None] == of_class[None, :]
            off = ~torch.eye(10, dtype=torch.bool)
            within_group = float(m[same & off].nanmean())
            between_groups = float(m[~same].nanmean())
            assert result.groups[pair][kind].between_class_within_group == pytest.approx(within_group, abs=1e-5)
            assert result.groups[pair][kind].between_groups == pytest.approx(between_groups, abs=1e-5)
            for tag, want in (("between_class_within_group", within_group), ("between_groups", between_groups)):
                (event,) = acc.Scalars(f"stiffness/{pair}/{kind}/{tag}")
                assert event.step == result.step and event.value == pytest.approx(want, abs=1e-5)
            assert f"stiffness/{pair}/{kind}/group_matrix" in acc.Tags()["images"]


def test_group_list_form_and_groups_of_one_class(tmp_path):
    train, val = digits_sets()
    data = Data(train, val)
    seed_everything(0)
    groups = ["a", "b", "b", "b", "b", "b", "b", "b", "b", "c"]  # "a" and "c" hold one class each
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], class_groups=groups, num_bootstrap=0,
                           every_n_epochs=0, log_images=False)  # fmt: skip
    t, _ = fit(tmp_path / "list", Net(), data, cb)
    (result,) = probe_results(t).values()
    assert result.group_names == ["a", "b", "c"]
    assert math.isfinite(result.groups["train-train"]["cosine"].between_class_within_group)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], class_groups=list(range(10)), num_bootstrap=0,
                           every_n_epochs=0, log_images=False)  # fmt: skip
    t, _ = fit(tmp_path / "singletons", Net(), data, cb)
    (result,) = probe_results(t).values()
    assert math.isnan(result.groups["train-train"]["cosine"].between_class_within_group)  # no two classes share a group
    assert math.isfinite(result.groups["train-train"]["cosine"].between_groups)


@pytest.mark.parametrize(
    "groups",
    [
        {"a": [0, 1, 2, 3, 4], "b": [4, 5, 6, 7, 8, 9]},  # a class in two groups
        {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8]},  # class 9 in no group
        {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9, 10]},  # unknown class 10
        {"a": [-1, 0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]},  # negative class
        [0, 0, 1, 1],  # a list with the wrong length
    ],
)
@pytest.mark.parametrize("strict", [True, False])
def test_bad_class_groups_raise_an_error_naming_the_argument(tmp_path, groups, strict):
    """Errors that only show once the classes are known must still stop the run, naming `class_groups`, not turn
    every probe into a skipped one."""
    train, val = digits_sets()
    data = Data(train, val)
    cb = StiffnessCallback(samples_per_class=2, class_groups=groups, strict=strict, log_images=False, num_bootstrap=0)
    t = trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)
    with pytest.raises((MisconfigurationException, ValueError), match="class_groups"):
        t.fit(Net(), datamodule=data)


@pytest.mark.parametrize("groups", ["abc", {"a": "0123"}, {}, [], [0.5] * 10, {"a": [0, 1.0]}, [True] * 10])
def test_malformed_class_groups_are_refused_at_construction(groups):
    with pytest.raises(MisconfigurationException, match="class_groups"):
        StiffnessCallback(class_groups=groups)
