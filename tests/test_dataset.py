"""Exact class stiffness over a whole dataset: equal to the class matrix of the whole Gram matrix, on models whose
parameters are factored, convolutional, or left to the exact fallback (a GRU), and under 2-process DDP."""

import contextlib
import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

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
from tests.helpers import (
    Data,
    DigitsData,
    Net,
    Snapshots,
    TinyNet,
    digits_tensors,
    events,
    fit,
    probe_reference,
    probe_results,
    raw_results,
    trainer,
)
from tests.models.basic import DigitsCNN, MeanPool, tanh_mlp
from tests.models.sequences import PackedRecurrent, RecurrentClassifier
from tests.reference import class_matrix_loop, coherence64, cos64, reference_gradients, within_between64


def _case(name: str, n: int = 1000):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    if name == "mlp":
        model, x = tanh_mlp(8, 16, 4), torch.randn(n, 8, generator=generator)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))
        x = torch.randn(n, 1, 6, 6, generator=generator)
    else:
        model, x = RecurrentClassifier("gru", 3, 6, 4), torch.randn(n, 5, 3, generator=generator)
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


def _dataset_loop(g, y, num_classes):
    """Mean cosine over all pairs i != j by class pair; examples with a zero gradient left out."""
    keep = g.norm(dim=1) > 0
    g, y = g[keep], y[keep]
    return class_matrix_loop(cos64(g, g), y, y, num_classes, same_set=True)


def _dataset_case(name):
    torch.manual_seed(0)
    x, y = digits_tensors(301)
    if name == "mlp":
        model = tanh_mlp(64, 16, 10)
    elif name == "cnn":
        model = DigitsCNN()
        bn = model.body[1]
        with torch.no_grad():
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    else:
        model = RecurrentClassifier("gru", 8, 6, 10, steps=8)
    return model.eval(), x, y


@pytest.mark.parametrize("name", ["mlp", "cnn", "gru"])
def test_dataset_class_stiffness_against_a_float64_loop(name):
    """301 examples in batches of 30 (the last one holds a single example), shuffled; class 9 reduced to a single
    example (its diagonal entry NaN)."""
    model, x, y = _dataset_case(name)
    y = y.clone()
    nines = torch.nonzero(y == 9).flatten()
    y[nines[1:]] = 8  # one example of class 9 left
    before = copy.deepcopy(model.state_dict())
    expected = _dataset_loop(reference_gradients(model, x, y, float64_copy=True), y, 10)
    loader = DataLoader(TensorDataset(x, y), batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(x) % 30 == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dataset_class_stiffness(model, loader, num_classes=10)
    assert got.dtype == torch.float64 and got.shape == (10, 10)
    assert math.isnan(got[9, 9]) and math.isnan(expected[9, 9])
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True), (got - expected).abs().nan_to_num().max()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class Tokens(Dataset):
    def __init__(self, n=120, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 9, (1,), generator=g))
            label = int(torch.randint(0, 4, (1,), generator=g))
            tokens = torch.randint(1, 20, (length,), generator=g)
            tokens[0] = 1 + label  # a class signal
            self.items.append({"tokens": tokens, "cls": torch.tensor(label)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collate(items):
    longest = max(len(it["tokens"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest)
    for k, it in enumerate(items):
        ids[k, : len(it["tokens"])] = it["tokens"]
        mask[k, : len(it["tokens"])] = 1
    return {"ids": ids, "mask": mask, "cls": torch.stack([it["cls"] for it in items])}


def test_dataset_class_stiffness_dict_batches_with_padding():
    torch.manual_seed(0)
    data = Tokens()
    model = MeanPool(20, 6, 4).eval()
    forward = lambda m, x: m(x["ids"], x["mask"])  # noqa: E731
    to_xy = lambda batch: ({"ids": batch["ids"], "mask": batch["mask"]}, batch["cls"])  # noqa: E731
    # Reference: each example alone, unpadded.
    rows, labels = [], []
    for item in data.items:
        x = {"ids": item["tokens"][None], "mask": torch.ones(1, len(item["tokens"]))}
        rows.append(reference_gradients(model, x, item["cls"][None], forward_fn=forward, float64_copy=True))
        labels.append(int(item["cls"]))
    y = torch.tensor(labels)
    expected = _dataset_loop(torch.cat(rows), y, 4)
    loader = DataLoader(data, batch_size=16, shuffle=True, collate_fn=pad_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dataset_class_stiffness(model, loader, 4, forward_fn=forward, batch_to_xy=to_xy)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True), (got - expected).abs().max()


def test_dataset_class_stiffness_with_zero_gradient_examples():
    """Examples with no gradient have no direction: left out (as their NaN stiffness is in a probe)."""
    x, y = digits_tensors(120)
    torch.manual_seed(0)
    model = Net(dead_pixel=True).eval()
    g = reference_gradients(model, x, y, float64_copy=True)
    assert (g.norm(dim=1) == 0).any() and (g.norm(dim=1) > 0).sum() > 50
    expected = _dataset_loop(g, y, 10)
    got = dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=25), 10)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True)


def test_callback_dataset_measure_logs_saves_and_leaves_training_unchanged(tmp_path):
    x, y = digits_tensors(180)
    train = TensorDataset(x[:130], y[:130])
    val = TensorDataset(x[130:], y[130:])
    data = Data(train, val, batch_size=16, shuffle=True)

    def run(path, callbacks):
        seed_everything(0)
        model = Net(kind="bn", dropout=0.2)
        t = trainer(path, callbacks, max_epochs=2, limit_train_batches=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, datamodule=data)
        return t, model

    _, plain = run(tmp_path / "plain", [])
    snaps = Snapshots()
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], dataset_every_n_epochs=1, num_bootstrap=0)
    t, measured = run(tmp_path / "measured", [snaps, cb])
    for (k, a), (k2, b) in zip(plain.state_dict().items(), measured.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k

    raw = raw_results(t.log_dir)
    files = sorted(name for name in raw if name.startswith("dataset"))
    assert files == ["dataset-epoch=0-step=3.pt", "dataset-epoch=1-step=6.pt"]
    acc = events(t.log_dir)
    within = {e.step: e.value for e in acc.Scalars("stiffness/dataset/cosine/within_class")}
    between = {e.step: e.value for e in acc.Scalars("stiffness/dataset/cosine/between_class")}
    images = {e.step for e in acc.Images("stiffness/dataset/cosine/class_matrix")}
    assert set(within) == set(between) == images == {3, 6}
    for event in acc.Images("stiffness/dataset/cosine/class_matrix"):
        picture = Image.open(io.BytesIO(event.encoded_image_string))
        assert picture.size[0] > 100 and picture.size[1] > 100
    for name in files:
        saved = raw[name]
        assert set(saved) == {"class_matrix", "epoch", "step", "seconds"}
        step = saved["step"]
        model = Net(kind="bn", dropout=0.2)
        model.load_state_dict(snaps.states[step])
        expected = _dataset_loop(reference_gradients(model, x[:130], y[:130], float64_copy=True), y[:130], 10)
        assert torch.allclose(saved["class_matrix"].double(), expected, atol=2e-6, equal_nan=True)
        w, b = within_between64(expected)
        assert within[step] == pytest.approx(w, abs=1e-5)
        assert between[step] == pytest.approx(b, abs=1e-5)


def test_float64_training_probe_and_dataset_measure_agree_with_float64_loops(tmp_path):
    """precision="64-true": the probe and the whole-training-set measure run in float64 (no dtype clash with the
    loader's float32 inputs) and agree with float64 loops to ~1e-10."""
    x, y = digits_tensors(150)
    train, val = TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])
    data = Data(train, val, batch_size=32)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], dataset_every_n_epochs=1, num_bootstrap=0,
                           log_images=False, probe_at_start=False)  # fmt: skip
    t, snaps = fit(tmp_path, Net(kind="bn"), data, cb, precision="64-true")
    raw = raw_results(t.log_dir)
    assert "dataset-epoch=0-step=2.pt" in raw, sorted(raw)
    model = Net(kind="bn").double()
    model.load_state_dict(snaps.states[2])
    expected = _dataset_loop(reference_gradients(model, x[:100], y[:100], float64_copy=True), y[:100], 10)
    got = raw["dataset-epoch=0-step=2.pt"]["class_matrix"]
    assert torch.allclose(got, expected, atol=1e-10, equal_nan=True), (got - expected).abs().nan_to_num().max()
    (result,) = probe_results(t).values()
    g, _, _, _ = probe_reference({"kind": "bn"}, snaps.states[result.step], result, data)
    coherence, diversity = coherence64(g["train"])
    assert result.gradient_coherence["train"] == pytest.approx(coherence, rel=1e-9)
    assert result.gradient_diversity["train"] == pytest.approx(diversity, rel=1e-9)


def test_dataset_class_stiffness_frozen_layer_custom_loss_and_errors():
    torch.manual_seed(0)
    x, y = digits_tensors(90)
    model = tanh_mlp(64, 10, 10).eval()
    model[0].requires_grad_(False)

    def loss_fn(out, t):  # per-example squared error to the one-hot target
        return ((out - F.one_hot(t, 10).to(out.dtype)) ** 2).sum(1)

    expected = _dataset_loop(reference_gradients(model, x, y, loss_fn, float64_copy=True), y, 10)
    got = dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=7), 10, loss_fn=loss_fn)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True)
    assert model[0].weight.grad is None and model[2].weight.grad is None
    with pytest.raises(ValueError, match="num_classes"):
        dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=7), 0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        dataset_class_stiffness(model, DataLoader(TensorDataset(x, y), batch_size=7), 5)
    bn = nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Linear(4, 10)).train()
    with pytest.raises(ValueError, match=r"(?i)batchnorm|train"):
        dataset_class_stiffness(bn, DataLoader(TensorDataset(x, y), batch_size=7), 10)


def test_bf16_true_training_still_gets_the_dataset_measure(tmp_path):
    """The probe converts its inputs as the precision plugin does; the whole-training-set measure must too."""
    x, y = digits_tensors(150)
    data = Data(TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:]), batch_size=32)
    seed_everything(0)
    cb = StiffnessCallback(samples_per_class=2, kinds=["cosine"], dataset_every_n_epochs=1, num_bootstrap=0,
                           log_images=False, probe_at_start=False, strict=False)  # fmt: skip
    t, _ = fit(tmp_path, Net(), data, cb, precision="bf16-true")
    assert "dataset-epoch=0-step=2.pt" in raw_results(t.log_dir)


def test_dataset_class_stiffness_packed_gru_dict_batches():
    torch.manual_seed(0)
    data = Tokens(n=90, seed=1)
    model = PackedRecurrent("gru", 20, 6, 4, embedding=5, padding_idx=None).eval()
    forward = lambda m, x: m(x["ids"], x["mask"])  # noqa: E731
    to_xy = lambda batch: ({"ids": batch["ids"], "mask": batch["mask"]}, batch["cls"])  # noqa: E731
    rows = [
        reference_gradients(
            model,
            {"ids": it["tokens"][None], "mask": torch.ones(1, len(it["tokens"]))},
            it["cls"][None],
            forward_fn=forward,
            float64_copy=True,
        )
        for it in data.items
    ]
    y = torch.tensor([int(it["cls"]) for it in data.items])
    expected = _dataset_loop(torch.cat(rows), y, 4)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=pad_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dataset_class_stiffness(model, loader, 4, forward_fn=forward, batch_to_xy=to_xy)
    assert torch.allclose(got, expected, atol=2e-6, equal_nan=True), (got - expected).abs().max()
