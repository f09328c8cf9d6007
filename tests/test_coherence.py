"""Gradient coherence and diversity through the callback and the functions, against float64 per-example gradients:
zero-gradient examples counted in the means, a validation set of one example (coherence and diversity 1)."""

import warnings

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import gradient_coherence, gradient_diversity, gradient_gram
from tests.helpers import Data, Net, digits_sets, digits_tensors, events, fit, probe_reference, probe_results
from tests.reference import check_intervals_against_brute_force, coherence64, reference_gradients


@pytest.mark.parametrize("kind", ["mlp", "gru", "bn"])
def test_functional_coherence_and_diversity_against_per_example_gradients(kind):
    torch.manual_seed(0)
    x, y = digits_tensors(40)
    model = Net(kind=kind).eval()
    if kind == "bn":  # non-trivial running statistics
        with torch.no_grad():
            model.net[1].running_mean.uniform_(-0.5, 0.5)
            model.net[1].running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gram = gradient_gram(model, x, y)
    g = reference_gradients(model, x, y, float64_copy=True)
    coherence, diversity = coherence64(g)
    assert gradient_coherence(gram) == pytest.approx(coherence, rel=1e-5)
    assert gradient_diversity(gram) == pytest.approx(diversity, rel=1e-5)
    assert len(y) * coherence == pytest.approx(1 / diversity, rel=1e-9)


@pytest.mark.parametrize("kind", ["gru", "bn"])
def test_logged_coherence_and_diversity_against_per_example_gradients(tmp_path, kind):
    train, val = digits_sets()
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=3, kinds=["cosine"], num_bootstrap=0, log_images=False)
    t, snaps = fit(tmp_path, Net(kind=kind), data, cb)
    results = probe_results(t)
    acc = events(t.log_dir)
    for result in results.values():
        g, _, _, _ = probe_reference({"kind": kind}, snaps.states[result.step], result, data)
        for name in ("train", "val"):
            coherence, diversity = coherence64(g[name])
            assert result.gradient_coherence[name] == pytest.approx(coherence, rel=1e-5)
            assert result.gradient_diversity[name] == pytest.approx(diversity, rel=1e-5)
            logged = {e.step: e.value for e in acc.Scalars(f"stiffness/{name}/gradient_coherence")}
            assert logged[result.step] == pytest.approx(coherence, rel=1e-5)
            logged = {e.step: e.value for e in acc.Scalars(f"stiffness/{name}/gradient_diversity")}
            assert logged[result.step] == pytest.approx(diversity, rel=1e-5)


def test_coherence_with_zero_gradient_examples(tmp_path):
    """Examples with a zero gradient count in the means (the definitions average over the whole probe set)."""
    train, val = digits_sets()
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=4, kinds=["cosine"], num_bootstrap=0, log_images=False, every_n_epochs=0)
    t, snaps = fit(tmp_path, Net(dead_pixel=True), data, cb)
    (result,) = probe_results(t).values()
    g, _, _, _ = probe_reference({"dead_pixel": True}, snaps.states[result.step], result, data)
    assert ((g["train"] == 0).all(1)).any()
    for name in ("train", "val"):
        coherence, diversity = coherence64(g[name])
        assert result.gradient_coherence[name] == pytest.approx(coherence, rel=1e-5)
        assert result.gradient_diversity[name] == pytest.approx(diversity, rel=1e-5)


def test_a_validation_set_of_one_example(tmp_path):
    """N = 1: coherence |g|^2/|g|^2 = 1 and diversity 1 (both definitions hold); the probe is not lost."""
    x, y = digits_tensors(200)
    train, val = TensorDataset(x[:150], y[:150]), TensorDataset(x[150:151], y[150:151])
    data = Data(train, val)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], every_n_epochs=0, log_images=False, num_bootstrap=20)
    t, snaps = fit(tmp_path, Net(), data, cb)
    results = probe_results(t)
    assert len(results) == 1
    (result,) = results.values()
    assert len(result.labels["val"]) == 1
    assert result.gradient_coherence["val"] == pytest.approx(1.0)
    assert result.gradient_diversity["val"] == pytest.approx(1.0)
    _, cos, dist, _ = probe_reference({}, snaps.states[result.step], result, data)
    check_intervals_against_brute_force(result, cos, dist, seed=0, num_draws=20)
