"""StiffnessCallback in real Trainer runs on bundled digits: what it logs, what it saves, what it must not change."""

import copy
import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.exceptions import STRICT_ENV
from lightning_stiffness.functional import class_stiffness, within_between
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import (
    KINDS,
    MODEL,
    PAIRS,
    SIDES,
    class_matrix_tag,
    class_tag,
    critical_distance_tag,
    distance_curve_tag,
    layer_class_tag,
)
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer
from tests.reference import reference_gradients

SCALAR_TAGS = [class_tag(p, k, side) for p in PAIRS for k in KINDS for side in SIDES]
SCALAR_TAGS += [critical_distance_tag(p) for p in PAIRS]
IMAGE_TAGS = [class_matrix_tag(p, k) for p in PAIRS for k in KINDS] + [distance_curve_tag(p) for p in PAIRS]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-epoch run probed at initialisation and after each epoch (steps 0, 4, 8)."""
    tmp_path = tmp_path_factory.mktemp("run")
    seed_everything(0)
    model = TinyNet()
    callback = StiffnessCallback(samples_per_class=3, seed=1)
    fit = trainer(tmp_path, [callback])
    fit.fit(model, datamodule=DigitsData())
    return fit, model, callback


def test_every_documented_scalar_once_per_probe(run):
    fit, _, _ = run
    scalars = events(fit.log_dir)
    for tag in SCALAR_TAGS:
        assert [e.step for e in scalars.Scalars(tag)] == [0, 4, 8], tag
    assert [e.step for e in scalars.Scalars("stiffness/probe_seconds")] == [0, 4, 8]


def test_every_documented_image_decodes(run):
    fit, _, _ = run
    images = events(fit.log_dir)
    assert sorted(t for t in images.Tags()["images"]) == sorted(IMAGE_TAGS)
    for tag in IMAGE_TAGS:
        entries = images.Images(tag)
        assert [e.step for e in entries] == [0, 4, 8], tag
        picture = Image.open(io.BytesIO(entries[-1].encoded_image_string))
        assert min(picture.size) >= 400 and picture.mode == "RGB"
        assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 10  # not a blank canvas


def test_raw_files_load_and_agree_with_scalars(run):
    fit, _, _ = run
    raw = raw_results(fit.log_dir)
    assert sorted(raw) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt"]
    scalars = events(fit.log_dir)
    for index, data in enumerate(raw[name] for name in ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt"]):
        result = StiffnessResult.from_dict(data)
        for tag, value in result.scalars().items():
            logged = scalars.Scalars(tag)[index].value
            assert (math.isnan(value) and math.isnan(logged)) or logged == pytest.approx(value, rel=1e-6), tag
        # The class matrices and within/between numbers follow from the saved stiffness matrices.
        measures = result.classes["train-train"]["cosine"][MODEL]
        matrix = class_stiffness(measures.stiffness, result.labels["train"], num_classes=10)
        torch.testing.assert_close(matrix, measures.matrix, equal_nan=True)
        assert within_between(matrix)[0] == pytest.approx(measures.within)
        assert len(result.indices["train"]) == 30 and len(result.indices["val"]) == 30
        assert torch.bincount(result.labels["train"], minlength=10).tolist() == [3] * 10


def test_last_probe_matches_brute_force_float64(run):
    fit, model, _ = run
    last = StiffnessResult.from_dict(raw_results(fit.log_dir)["epoch=1-step=8.pt"])
    data = fit.datamodule
    reference = copy.deepcopy(model.net).double().eval()
    grads = {}
    for name, dataset in (("train", data.train_set), ("val", data.val_set)):
        x, y = dataset.tensors[0][last.indices[name]], dataset.tensors[1][last.indices[name]]
        assert torch.equal(y, last.labels[name])
        grads[name] = reference_gradients(reference, x.double(), y)
    for pair in PAIRS:
        rows, cols = pair.split("-")
        a, b = grads[rows], grads[cols]
        cosine = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(last.classes[pair]["cosine"][MODEL].stiffness.double(), cosine, atol=2e-5, rtol=1e-4)
        sign = torch.sign(a @ b.T)
        agree = (last.classes[pair]["sign"][MODEL].stiffness.double() == sign).double().mean()
        assert agree > 0.99  # float32 vs float64 may differ only where the dot product is ~0


def test_last_result_kept_and_state_dict_has_indices(run):
    _, _, callback = run
    assert callback.last_result is not None and callback.last_result.step == 8
    state = callback.state_dict()
    assert torch.equal(state["indices"]["train"], callback.last_result.indices["train"])
    assert state["probes_done"] == 3


def _train(tmp_path, callbacks, **kwargs):
    seed_everything(7)
    model = TinyNet(dropout=0.3)
    trainer(tmp_path, callbacks, **kwargs).fit(model, datamodule=DigitsData())
    return model


def test_training_trajectory_unchanged(tmp_path):
    plain = _train(tmp_path / "plain", [])
    probed = _train(tmp_path / "probed", [StiffnessCallback(samples_per_class=2)])
    for (name, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert probed.training  # mode restored after the probes


def test_resume_probes_the_same_examples(tmp_path):
    first = trainer(
        tmp_path, [StiffnessCallback(samples_per_class=2, seed=3), ModelCheckpoint(save_last=True)], max_epochs=1
    )
    seed_everything(0)
    first.fit(TinyNet(), datamodule=DigitsData())
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    second = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, seed=99)], max_epochs=2)
    with pytest.warns(UserWarning, match="drawn with seed=3, and this callback has seed=99. The checkpoint's examples"):
        second.fit(TinyNet(), datamodule=DigitsData(), ckpt_path=ckpt)
    before = raw_results(first.log_dir)["epoch=0-step=4.pt"]
    after = raw_results(second.log_dir)
    assert sorted(after) == ["epoch=1-step=8.pt"]  # no probe "at initialisation" on a resumed run
    for name in ("train", "val"):
        assert torch.equal(after["epoch=1-step=8.pt"]["indices"][name], before["indices"][name])


def test_schedule_epochs_and_no_start_probe(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, epochs=[1, 2], probe_at_start=False, log_images=False)
    fit = trainer(tmp_path, [callback], max_epochs=3)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert sorted(raw_results(fit.log_dir)) == ["epoch=1-step=8.pt", "epoch=2-step=12.pt"]
    assert "images" not in events(fit.log_dir).Tags() or not events(fit.log_dir).Tags()["images"]


def test_every_n_epochs_and_image_cadence(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, every_n_epochs=2, images_every_n_probes=2, kinds=["sign"])
    fit = trainer(tmp_path, [callback], max_epochs=4)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert sorted(raw_results(fit.log_dir)) == ["epoch=0-step=0.pt", "epoch=1-step=8.pt", "epoch=3-step=16.pt"]
    acc = events(fit.log_dir)
    assert [e.step for e in acc.Images("stiffness/train-train/sign/class_matrix")] == [0, 16]
    assert not any("cosine" in tag for tag in acc.Tags()["scalars"])


def test_monitors_can_use_stiffness(tmp_path):
    tag = class_tag("train-train", "cosine", "within")
    stop = EarlyStopping(monitor=tag, mode="max", patience=0, min_delta=10.0)  # stops after the second check
    checkpoint = ModelCheckpoint(monitor=tag, mode="max", filename="best")
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, log_images=False), stop, checkpoint], max_epochs=5)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert fit.current_epoch == 2  # stopped early, driven by the stiffness scalar
    assert tag in fit.callback_metrics
    assert checkpoint.best_model_score is not None


def test_csv_logger_gets_scalars_and_png_images(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], logger=CSVLogger(tmp_path), max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert not [w for w in caught if "Stiffness" in str(w.message)]
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "stiffness/train-val/cosine/within_class" in metrics
    assert len(raw_results(fit.log_dir)) == 3
    for tag in IMAGE_TAGS:  # beside the raw results: {log_dir}/{tag}/epoch=E-step=S.png
        files = sorted(p.name for p in (Path(fit.log_dir) / tag).glob("*.png"))
        assert files == ["epoch=0-step=0.png", "epoch=0-step=4.png", "epoch=1-step=8.png"], tag


def test_dict_items_and_batch_to_xy_import_path(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, log_images=False)], max_epochs=1)
    fit.fit(TinyNet(), datamodule=DigitsData(dict_items=True))
    assert len(raw_results(fit.log_dir)) == 2
    # An import path is resolved when the fit sets up (swap_xy takes the same entries as the default would).
    path = "tests.test_callback.swap_xy"
    callback = StiffnessCallback(samples_per_class=2, batch_to_xy=path, log_images=False, save_raw=False)
    assert callback.batch_to_xy == path
    again = trainer(tmp_path / "path", [callback], max_epochs=1)
    again.fit(TinyNet(), datamodule=DigitsData(dict_items=True))
    assert callback.last_result is not None and callback.last_result.step == again.global_step


def swap_xy(item):
    return item["image"], item["label"]


def test_probe_failure_warns_and_training_goes_on(tmp_path):
    model = TinyNet(nan_after_epoch=1)
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, log_images=False)], max_epochs=3)
    with pytest.warns(UserWarning, match=r"probe at epoch 1, step 8 was skipped: ProbeSkipped: the loss is not finite"):
        fit.fit(model, datamodule=DigitsData())
    assert fit.current_epoch == 3  # training finished
    assert sorted(raw_results(fit.log_dir)) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt"]
    assert model.training


class MaskedNaN(TinyNet):
    """Masks the hidden units a NaN input feature reaches (``torch.where``): the loss stays finite, the weights'
    gradient (input times upstream gradient, 0 * NaN) does not."""

    def forward(self, x):
        h = self.net[0](x.flatten(1))
        return self.net[3](self.net[1](torch.where(h.isnan(), torch.zeros_like(h), h)))


def test_a_nan_gradient_with_a_finite_loss_skips_the_probe_naming_the_examples(tmp_path):
    data = DigitsData()
    x = data.val_set.tensors[0]
    x[[0, 5], 3] = float("nan")  # two validation examples (never trained on) with a missing feature
    callback = StiffnessCallback(samples_per_class=40, log_images=False)  # every validation example is probed
    fit = trainer(tmp_path, [callback], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(MaskedNaN(), datamodule=data)
    skipped = [str(w.message) for w in caught if "was skipped" in str(w.message)]
    assert len(skipped) == 2  # the probe at initialisation and the one at the epoch's end, one warning each
    assert all(
        "ProbeSkipped: the gradient is not finite (NaN or inf) for 2 of" in m and "val #0, val #5" in m for m in skipped
    )
    assert callback.last_result is None and not raw_results(fit.log_dir)


class CleanedNaN(TinyNet):
    """Replaces a NaN input feature by 0 before any weight: the gradients are finite, 1 - cos of that input is not."""

    def forward(self, x):
        return super().forward(torch.nan_to_num(x))


def test_undefined_distances_are_named_and_the_probe_runs(tmp_path):
    data = DigitsData()
    x = data.val_set.tensors[0]
    x[0, 3] = float("nan")  # no distance to anything in input space
    x[5] = 0.0  # no direction: 1 - cos is undefined
    callback = StiffnessCallback(samples_per_class=40, log_images=False, layers=["net.1"])  # every val example
    fit = trainer(tmp_path, [callback], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(CleanedNaN(), datamodule=data)
    messages = [str(w.message) for w in caught if "distances in" in str(w.message)]
    assert messages and all("distances in input space are undefined for 2 of" in m for m in messages)
    assert all("val #0, val #5 (probe set #dataset index)" in m and "left out of the distance curves" in m
               for m in messages)  # fmt: skip
    result = callback.last_result
    assert result is not None and not any("net.1" in m for m in messages)  # the layer's outputs are all defined
    n = len(result.labels["val"])
    curves = result.spaces["val-val"]["input"].curves
    counted = sum(int(curve.count.sum()) for curve in curves.values())
    assert counted == (n - 2) * (n - 3)  # the ordered pairs among the other examples only


def test_short_class_uses_what_it_has_with_one_warning(tmp_path):
    with pytest.warns(UserWarning, match="fewer than 40 examples") as caught:
        fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=40, log_images=False)], max_epochs=1)
        fit.fit(TinyNet(), datamodule=DigitsData(n=300))
    assert sum("fewer than 40" in str(w.message) for w in caught) == 2  # once for train, once for val


def test_fast_dev_run_is_idle(tmp_path):
    callback = StiffnessCallback(samples_per_class=2)
    fit = trainer(tmp_path, [callback], fast_dev_run=True)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert callback.last_result is None
    assert not (tmp_path / "lightning_logs").exists()


def test_no_validation_data_probes_train_only(tmp_path):
    fit = trainer(
        tmp_path, [StiffnessCallback(samples_per_class=2, log_images=False)], limit_val_batches=0, max_epochs=1
    )
    fit.fit(TinyNet(), datamodule=DigitsData())
    result = StiffnessResult.from_dict(raw_results(fit.log_dir)["epoch=0-step=4.pt"])
    assert result.pairs == ["train-train"]


def test_regression_targets_refused(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=1)
    with pytest.raises(MisconfigurationException, match="integer class labels"):
        fit.fit(TinyNet(), datamodule=DigitsData(float_labels=True))


def test_no_logger_refused(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], logger=False)
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        fit.fit(TinyNet(), datamodule=DigitsData())


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_sharded_strategy_refused(package):
    strategies = pytest.importorskip(f"{package}.strategies")

    class FakeTrainer:
        strategy = strategies.FSDPStrategy()

    with pytest.raises(MisconfigurationException, match="sharded strategy FSDPStrategy"):
        StiffnessCallback().setup(FakeTrainer(), TinyNet(), "fit")


def test_two_callbacks_in_one_trainer_log_and_resume_their_own_examples(tmp_path):
    def callbacks():
        return [
            StiffnessCallback(samples_per_class=2, kinds=["cosine"], log_images=False),
            StiffnessCallback(samples_per_class=3, kinds=["sign"], seed=5, prefix="stiffness-sign", log_images=False),
        ]

    seed_everything(0)
    first = trainer(tmp_path, [*callbacks(), ModelCheckpoint(save_last=True)], max_epochs=1)
    first.fit(TinyNet(), datamodule=DigitsData())
    scalars = events(first.log_dir)
    assert [e.step for e in scalars.Scalars(class_tag("train-val", "cosine", "within"))] == [0, 4]
    assert [e.step for e in scalars.Scalars(class_tag("train-val", "sign", "within", "stiffness-sign"))] == [0, 4]
    assert [e.step for e in scalars.Scalars(critical_distance_tag("val-val", prefix="stiffness-sign"))] == [0, 4]
    assert class_tag("train-val", "sign", "within") not in scalars.Tags()["scalars"]

    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    second = trainer(tmp_path, callbacks()[::-1], max_epochs=2)  # in the other order: states are found by key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.fit(TinyNet(), datamodule=DigitsData(), ckpt_path=ckpt)
    assert not [w for w in caught if "Stiffness" in str(w.message) or "callbacks used to create" in str(w.message)]
    drawn = {}
    for prefix, size in (("stiffness", 20), ("stiffness-sign", 30)):
        before = raw_results(first.log_dir, prefix)["epoch=0-step=4.pt"]
        after = raw_results(second.log_dir, prefix)
        assert sorted(after) == ["epoch=1-step=8.pt"], prefix
        for name in ("train", "val"):
            assert torch.equal(after["epoch=1-step=8.pt"]["indices"][name], before["indices"][name]), prefix
        drawn[prefix] = before["indices"]["train"]
        assert len(drawn[prefix]) == size
    assert not torch.equal(drawn["stiffness"], drawn["stiffness-sign"][:20])


def test_same_settings_twice_are_refused_by_lightning():
    # The key holds prefix and kinds (tests/test_callback_settings.py): with both equal, Lightning refuses the second.
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        trainer(Path("unused"), [StiffnessCallback(), StiffnessCallback(kinds=["sign", "cosine"], log_images=False)])


class _BuggyProbe(TinyNet):
    """A programming error that only the probe meets (it runs the model in eval mode with gradients)."""

    def forward(self, x):
        if not self.training and torch.is_grad_enabled():
            raise TypeError("unsupported operand (a bug)")
        return super().forward(x)


def test_unexpected_failure_raises_in_strict_mode(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, log_images=False, strict=True)], max_epochs=1)
    with pytest.raises(TypeError, match="a bug"):
        fit.fit(_BuggyProbe(), datamodule=DigitsData())


def test_unexpected_failure_is_skipped_when_not_strict(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, log_images=False, strict=False)
    fit = trainer(tmp_path, [callback], max_epochs=1)
    with pytest.warns(UserWarning, match=r"probe at initialisation was skipped: TypeError: unsupported operand"):
        fit.fit(_BuggyProbe(), datamodule=DigitsData())
    assert fit.current_epoch == 1 and callback.last_result is None


def test_strict_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "0")
    assert StiffnessCallback().strict is False and StiffnessCallback(strict=True).strict is True
    monkeypatch.setenv(STRICT_ENV, "1")
    assert StiffnessCallback().strict is True and StiffnessCallback(strict=False).strict is False


def test_class_names_given_are_kept_and_inferred_ones_are_private(tmp_path):
    names = [f"digit {d}" for d in range(10)]
    given = StiffnessCallback(samples_per_class=2, class_names=names, log_images=False)
    inferred = StiffnessCallback(samples_per_class=2, log_images=False, prefix="other")
    data = DigitsData()
    data.train_set.classes = [str(d) for d in range(12)]  # more names than classes present: the first ten are used
    trainer(tmp_path, [given, inferred], max_epochs=1).fit(TinyNet(), datamodule=data)
    assert given.class_names is names and given.class_names == [f"digit {d}" for d in range(10)]
    assert given._probes.class_names == names
    assert inferred.class_names is None and inferred._probes.class_names == [str(d) for d in range(10)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"samples_per_class": 1}, "`samples_per_class` must be an integer >= 2"),
        ({"epochs": []}, "`epochs` must be a non-empty list"),
        ({"epochs": [1, -2]}, "`epochs` must be a non-negative integer"),
        ({"every_n_epochs": -1}, "`every_n_epochs` must be a non-negative integer"),
        ({"epochs": [1], "every_n_epochs": 2}, "either `epochs` or `every_n_epochs`"),
        ({"kinds": ["cosine", "euclid"]}, "`kinds` must be distinct values among"),
        ({"method": "magic"}, "`method` must be one of"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive integer"),
        ({"num_distance_bins": 0}, "`num_distance_bins` must be a positive integer"),
        ({"images_every_n_probes": True}, "`images_every_n_probes` must be a positive integer"),
        ({"seed": -1}, "`seed` must be a non-negative integer"),
        ({"prefix": ""}, "`prefix` must be a non-empty tag prefix"),
        ({"prefix": "stiffness/"}, "`prefix` must be a non-empty tag prefix"),
        ({"class_names": ["a", 1]}, "`class_names` must be a list of strings"),
        ({"loss_fn": "no_such_module.loss"}, "`loss_fn`: cannot import"),
        ({"batch_to_xy": 3}, "`batch_to_xy` must be a callable or an import path"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        StiffnessCallback(**kwargs)


def test_no_warnings_in_a_plain_run(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert not [w for w in caught if "Stiffness" in str(w.message)]


def test_per_layer_stiffness_logged_and_exact(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, per_layer=True, kinds=["cosine"])], max_epochs=1)
    model = TinyNet()
    fit.fit(model, datamodule=DigitsData())
    acc = events(fit.log_dir)
    for pair in PAIRS:
        for layer in ("net.0", "net.3"):
            for side in SIDES:
                tag = layer_class_tag(pair, "cosine", layer, side)
                assert [e.step for e in acc.Scalars(tag)] == [0, 4], tag
        assert [e.step for e in acc.Images(f"stiffness/{pair}/by_layer")] == [0, 4]
    last = StiffnessResult.from_dict(raw_results(fit.log_dir)["epoch=0-step=4.pt"])
    assert last.gram_layers == ["net.0", "net.3"]
    data = fit.datamodule
    x = data.train_set.tensors[0][last.indices["train"]].double()
    y = last.labels["train"]
    reference = copy.deepcopy(model).double().eval()
    for layer in last.gram_layers:
        grads = reference_gradients(reference.net, x, y, params=[f"{layer[4:]}.weight", f"{layer[4:]}.bias"])
        cosine = (grads / grads.norm(dim=1, keepdim=True)) @ (grads / grads.norm(dim=1, keepdim=True)).T
        within, between = within_between(class_stiffness(cosine, y, num_classes=10))
        assert last.classes["train-train"]["cosine"][layer].within == pytest.approx(within, abs=1e-5)
        assert last.classes["train-train"]["cosine"][layer].between == pytest.approx(between, abs=1e-5)


def test_failed_write_warns_and_training_goes_on(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    callback = StiffnessCallback(samples_per_class=2, log_images=False)
    fit = trainer(tmp_path, [callback], max_epochs=2, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="raw results of the probe at initialisation failed: OSError: No space left"):
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert fit.current_epoch == 2 and callback.last_result is not None


class _BareTensors(DigitsData):
    """Items are bare input tensors: no labels anywhere."""

    def __init__(self):
        super().__init__()
        self.train_set = torch.utils.data.TensorDataset(self.train_set.tensors[0])


def test_dataset_without_labels_is_refused(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=1, limit_val_batches=0)
    with pytest.raises(MisconfigurationException, match=r"has no label: expected an \(x, y\) tuple .* `batch_to_xy`"):
        fit.fit(TinyNet(), datamodule=_BareTensors())
