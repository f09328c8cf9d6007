"""Representation-space distances: layer outputs, per-layer critical distances, and the callback's layer tags."""

import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import layer_outputs, pairwise_distances
from lightning_stiffness.measures.probe_measures import measure_stiffness
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer


def _known_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 2.0]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2]))
        model[2].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.0]]))
        model[2].bias.zero_()
    return model


def test_layer_outputs_match_direct_computation():
    model = _known_model()
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    hidden = x @ model[0].weight.T + model[0].bias
    out = layer_outputs(model, x, ["2", "0", "1"], chunk_size=2)
    assert list(out) == ["0", "1", "2"]  # network order, whatever order they were asked in
    torch.testing.assert_close(out["0"], hidden)
    torch.testing.assert_close(out["1"], hidden.clamp_min(0))
    torch.testing.assert_close(out["2"], hidden.clamp_min(0) @ model[2].weight.T)
    expected = 1 - torch.nn.functional.cosine_similarity(hidden[:, None], hidden[None], dim=-1)
    torch.testing.assert_close(pairwise_distances(out["0"]), expected.fill_diagonal_(0), atol=1e-6, rtol=1e-6)


def test_images_are_flattened():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    out = layer_outputs(model, torch.randn(4, 1, 6, 6), ["0"])
    assert out["0"].shape == (4, 32)


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"does not have: \['9'\]. Valid module names: 0, 1, 2"):
        layer_outputs(_known_model(), torch.zeros(2, 3), ["9"])


def test_module_run_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(self.layer(x))

    with pytest.raises(ValueError, match="ran 2 times in one forward pass"):
        layer_outputs(Twice(), torch.zeros(2, 3), ["layer"])


def test_critical_distance_per_layer_on_synthetic_stiffness():
    # Gradients and layer outputs are the same unit vectors at angles theta: cosine stiffness = cos(dtheta) and the
    # layer's cosine distance = 1 - cos(dtheta), so stiffness = 1 - distance exactly and xi = 1 in that layer.
    theta = torch.linspace(0, 2.5, 12, dtype=torch.float64)
    vectors = torch.stack([theta.cos(), theta.sin()], dim=1)
    labels = torch.tensor([0, 1] * 6)
    inputs = {"train": torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    result = measure_stiffness(
        vectors @ vectors.T,
        inputs,
        {"train": labels},
        {"train": torch.arange(12)},
        num_classes=2,
        representations={"train": {"hidden": vectors, "scaled": 3 * vectors}},
    )
    assert result.representation_layers == ["hidden", "scaled"]
    spaces = result.spaces["train-train"]
    assert list(spaces) == [INPUT, "hidden", "scaled"]
    assert spaces["hidden"].critical_distance == pytest.approx(1.0)
    assert spaces["scaled"].critical_distance == pytest.approx(1.0)  # cosine ignores scale
    assert result.scalars()["stiffness/train-train/critical_distance/hidden"] == pytest.approx(1.0)
    curve = spaces["hidden"].curves["within"]
    centres = (curve.edges[1:] + curve.edges[:-1]) / 2
    filled = curve.count > 0
    half_bin = 0.5 * (curve.edges[1] - curve.edges[0])
    assert torch.all((curve.mean[filled] - (1 - centres[filled])).abs() <= half_bin + 1e-9)
    back = StiffnessResult.from_dict(result.to_dict())
    assert {s: m.critical_distance for s, m in back.spaces["train-train"].items()} == {
        s: m.critical_distance for s, m in spaces.items()
    }
    assert back.spaces["train-train"]["hidden"].curves["within"].count.tolist() == curve.count.tolist()


def test_euclidean_layer_distance():
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    result = measure_stiffness(
        torch.eye(4, dtype=torch.float64),
        {"train": vectors},
        {"train": torch.tensor([0, 0, 1, 1])},
        {"train": torch.arange(4)},
        num_classes=2,
        representations={"train": {"h": vectors}},
        distance_metric="euclidean",
    )
    torch.testing.assert_close(result.spaces["train-train"]["h"].distances, torch.cdist(vectors, vectors))


def test_callback_logs_layer_distances(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, layers=["net.3", "net.1"], kinds=["cosine"])
    fit = trainer(tmp_path, [callback], max_epochs=1)
    fit.fit(TinyNet(), datamodule=DigitsData())
    acc = events(fit.log_dir)
    for pair in ("train-train", "train-val", "val-val"):
        for layer in ("net.1", "net.3"):
            assert [e.step for e in acc.Scalars(f"stiffness/{pair}/critical_distance/{layer}")] == [0, 4]
            assert len(acc.Images(f"stiffness/{pair}/distance_curve/{layer}")) == 2
        assert len(acc.Images(f"stiffness/{pair}/critical_distance_by_layer")) == 2
    result = StiffnessResult.from_dict(raw_results(fit.log_dir)["epoch=0-step=4.pt"])
    assert result.representation_layers == ["net.1", "net.3"]
    for pair, by_space in result.spaces.items():
        assert list(by_space) == [INPUT, "net.1", "net.3"]
        for layer in ("net.1", "net.3"):
            value = by_space[layer].critical_distance
            logged = acc.Scalars(f"stiffness/{pair}/critical_distance/{layer}")[-1].value
            assert (math.isnan(value) and math.isnan(logged)) or value == pytest.approx(logged, rel=1e-6)


def test_callback_unknown_layer_refused_at_setup(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, layers=["net.7"])], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"Valid module names: net, net.0, net.1"):
        fit.fit(TinyNet(), datamodule=DigitsData())


@pytest.mark.parametrize("kwargs", [{"layers": []}, {"layers": "net.1"}, {"layer_distance": "manhattan"}])
def test_callback_bad_layer_arguments(kwargs):
    with pytest.raises(MisconfigurationException, match="layer"):
        StiffnessCallback(**kwargs)
