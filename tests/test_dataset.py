"""Exact class stiffness over a whole dataset: equal to the class matrix of the whole Gram matrix, on models whose
parameters are factored, convolutional, or left to the exact fallback (a GRU), and under 2-process DDP."""

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import (
    class_stiffness,
    cosine_stiffness,
    dataset_class_stiffness,
    gradient_gram,
    within_between,
)
from lightning_stiffness.images.specs import dataset_specs
from lightning_stiffness.names import dataset_class_matrix_tag, dataset_class_tag
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer
from tests.reference import reference_gradients


class SmallGRU(nn.Module):
    """A GRU over 5 steps: its kernels have no factored rule (torch.func or the loop engine computes its norms)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 6, batch_first=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def _case(name: str, n: int = 1000):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if name == "mlp":
        model, x = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), torch.randn(n, 8, generator=generator)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))
        x = torch.randn(n, 1, 6, 6, generator=generator)
    else:
        model, x = SmallGRU(), torch.randn(n, 5, 3, generator=generator)
    return model.eval(), x, torch.randint(0, 4, (n,), generator=generator)


@pytest.mark.parametrize("name", ["mlp", "cnn", "gru"])
def test_equals_the_class_matrix_of_the_whole_gram_matrix(name):
    model, x, y = _case(name)
    with pytest.warns(UserWarning, match="loop engine") if name == "gru" else contextlib.nullcontext():
        expected = class_stiffness(cosine_stiffness(gradient_gram(model, x, y).double()), y, num_classes=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the GRU's loop-engine notice, once per batch
        got = dataset_class_stiffness(model, loader, 4)
    assert got.shape == (4, 4) and got.dtype == torch.float64
    scale = expected.abs().max()
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * scale), (got - expected).abs().max() / scale
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_float64_against_per_example_gradients():
    # The reference shares nothing with the engines: explicit per-example gradients, normalised, every pair.
    model, x, y = _case("mlp", n=120)
    model = model.double()
    x = x.double()
    g = reference_gradients(model, x, y)
    u = g / g.norm(dim=1, keepdim=True)
    cos = u @ u.T
    expected = torch.empty(4, 4, dtype=torch.float64)
    for a in range(4):
        for b in range(4):
            block = cos[y == a][:, y == b]
            expected[a, b] = (block.sum() - (block.trace() if a == b else 0)) / (
                block.numel() - (block.shape[0] if a == b else 0)
            )
    got = dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=50), 4)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_structured_batches_loss_and_missing_classes():
    model, x, y = _case("mlp", n=60)
    y = torch.where(y == 3, torch.zeros_like(y), y)  # class 3 absent
    batches = [{"features": x[i : i + 20], "target": y[i : i + 20]} for i in range(0, 60, 20)]

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out, t, reduction="none") * 2.0

    got = dataset_class_stiffness(model, batches, 4, loss_fn=loss_fn)
    expected = class_stiffness(cosine_stiffness(gradient_gram(model, x, y).double()), y, num_classes=4)
    assert torch.isnan(got[3]).all() and torch.isnan(got[:, 3]).all()
    assert torch.allclose(got[:3, :3], expected[:3, :3], atol=1e-6)


def test_errors_name_the_problem():
    model, x, y = _case("mlp", n=10)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        dataset_class_stiffness(model, [(x, y)], 2)
    with pytest.raises(ValueError, match="integer classes"):
        dataset_class_stiffness(model, [(x, y.float())], 4)
    with pytest.raises(ValueError, match="eval"):
        dataset_class_stiffness(nn.Sequential(nn.Linear(8, 4), nn.Dropout()).train(), [(x, y)], 4)


def _run(tmp_path, **kwargs):
    seed_everything(0)
    callback = StiffnessCallback(samples_per_class=3, dataset_every_n_epochs=1, num_bootstrap=0, kinds=["cosine"])
    fit = trainer(tmp_path, [callback], max_epochs=1, **kwargs)
    fit.fit(TinyNet(lr=0.0), datamodule=DigitsData())  # lr 0: the weights at the epoch's end are the initial ones
    (run_dir,) = sorted(tmp_path.glob("lightning_logs/version_*"))
    return run_dir


@pytest.mark.parametrize("ddp", [False, True], ids=["one-process", "ddp-2"])
def test_callback_logs_the_whole_training_set(tmp_path, ddp):
    options = {"strategy": "ddp_spawn", "accelerator": "cpu", "devices": 2} if ddp else {}
    run_dir = _run(tmp_path, **options)
    seed_everything(0)
    model = TinyNet(lr=0.0).eval()
    data = DigitsData()
    expected = dataset_class_stiffness(model, DataLoader(data.train_set, batch_size=64), 10)
    raw = raw_results(run_dir)
    assert sorted(raw) == ["dataset-epoch=0-step=4.pt", "epoch=0-step=0.pt", "epoch=0-step=4.pt"]
    got = raw["dataset-epoch=0-step=4.pt"]
    assert (got["epoch"], got["step"]) == (0, 4) and got["seconds"] > 0
    assert torch.allclose(got["class_matrix"], expected, atol=1e-5, equal_nan=True)
    within, between = within_between(expected)
    acc = events(run_dir)
    for tag, value in zip((dataset_class_tag("within"), dataset_class_tag("between")), (within, between), strict=True):
        (event,) = acc.Scalars(tag)
        assert event.step == 4 and event.value == pytest.approx(value, abs=1e-5)
    # The class matrix as an image at the same step, drawn from the same numbers.
    (image,) = acc.Images(dataset_class_matrix_tag())
    assert image.step == 4
    with Image.open(io.BytesIO(image.encoded_image_string)) as picture:
        assert picture.mode == "RGB" and min(picture.size) >= 400
    spec = dataset_specs(got["class_matrix"], [str(c) for c in range(10)], 0, 4)[dataset_class_matrix_tag()]
    np.testing.assert_allclose(spec.matrix, got["class_matrix"].double().numpy())
    assert f"within {within:.2f}, between {between:.2f}" in spec.title and "epoch 0, step 4" in spec.title
