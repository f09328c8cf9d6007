"""Which examples the probes take: a validation set Lightning loads late (``check_val_every_n_epoch`` without a
sanity check, a datamodule that builds its sets in ``setup``) is probed from the first probe, without changing
training; a collate that mixes examples at random (mixup, CutMix) is refused with a message naming
``probe_collate_fn``, which batches the probe examples (and the whole training set's) unmixed instead."""

import re
import warnings

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import dataset_class_stiffness
from tests.helpers import DictDataset, DigitsData, TinyNet, digits_tensors, raw_results, trainer

ALL_PAIRS = ["train-train", "train-val", "val-val"]


class LateData(LightningDataModule):
    """Digits whose datasets exist only after ``setup`` (as most datamodules build them)."""

    def __init__(self, collate=None, dict_items: bool = False) -> None:
        super().__init__()
        self.collate, self.dict_items = collate, dict_items
        self.train_set = self.val_set = None

    def setup(self, stage: str) -> None:
        x, y = digits_tensors(200)
        make = DictDataset if self.dict_items else TensorDataset
        self.train_set, self.val_set = make(x[:150], y[:150]), make(x[150:], y[150:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=25, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=25, collate_fn=self.collate)


def mixup(items):
    """Mixup in the collate: inputs blended with a shuffled copy of the batch, the hard labels kept."""
    x, y = default_collate(items)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    return lam * x + (1 - lam) * x[torch.randperm(len(y))], y


def soft_mixup(items):
    """Mixup with soft labels: a [B, 10] blend of one-hot labels (a dict batch, as from dict items)."""
    batch = default_collate(items)
    x, y = batch["image"], torch.nn.functional.one_hot(batch["label"], 10).float()
    lam, order = float(torch.distributions.Beta(0.4, 0.4).sample()), torch.randperm(len(x))
    return {"image": lam * x + (1 - lam) * x[order], "label": lam * y + (1 - lam) * y[order]}


def _fit(tmp_path, callbacks, data, **kwargs):
    seed_everything(0)
    model = TinyNet()
    trainer(tmp_path, callbacks, **kwargs).fit(model, datamodule=data)
    return model


@pytest.mark.parametrize("data", [DigitsData, LateData])
def test_a_validation_set_loaded_late_is_probed_from_the_first_probe(tmp_path, data):
    late = {"check_val_every_n_epoch": 2, "num_sanity_val_steps": 0, "max_epochs": 2}
    plain = _fit(tmp_path / "plain", [], data(), **late)
    callback = StiffnessCallback(samples_per_class=2, log_images=False, num_bootstrap=0)
    probed = _fit(tmp_path / "probed", [callback], data(), **late)
    assert sorted(callback._probe_sets.sets) == ["train", "val"]
    raw = raw_results(tmp_path / "probed" / "lightning_logs" / "version_0")
    assert sorted(raw) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt"]
    assert all(sorted(data["classes"]) == ALL_PAIRS for data in raw.values())
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # requesting the validation loader early changes no training step


class NoValidationStep(TinyNet):
    validation_step = LightningModule.validation_step  # Lightning's own: no validation runs


class TrainOnly(LateData):
    val_dataloader = LightningDataModule.val_dataloader  # Lightning's own: no validation loader


@pytest.mark.parametrize(
    ("module", "data", "trainer_args", "reason"),
    [
        (TinyNet, LateData, {"limit_val_batches": 0}, r"`limit_val_batches=0` turns validation off"),
        (NoValidationStep, LateData, {}, r"the module has no `validation_step`"),
        (TinyNet, TrainOnly, {}, r"there is no validation dataloader"),
    ],
)
def test_without_a_validation_set_one_warning_says_why(tmp_path, module, data, trainer_args, reason):
    callback = StiffnessCallback(samples_per_class=2, log_images=False, num_bootstrap=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], max_epochs=2, **trainer_args).fit(module(), datamodule=data())
    said = [str(w.message) for w in caught if "take the training set alone" in str(w.message)]
    assert len(said) == 1 and re.search(reason, said[0]), said
    assert sorted(callback._probe_sets.sets) == ["train"]
    assert callback.last_result.pairs == ["train-train"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: LateData(mixup), r"the training dataloader's `collate_fn` is random.*mixup.*`probe_collate_fn`"),
        (lambda: LateData(soft_mixup, dict_items=True), r"soft labels.*mixup.*`probe_collate_fn`"),
    ],
)
def test_a_mixing_collate_is_refused_naming_probe_collate_fn(tmp_path, data, message):
    callback = StiffnessCallback(samples_per_class=2, log_images=False)
    with pytest.raises(MisconfigurationException, match=message):
        _fit(tmp_path, [callback], data(), max_epochs=1)


@pytest.mark.parametrize("probe_collate_fn", [default_collate, "torch.utils.data.default_collate"])
def test_probe_collate_fn_batches_the_probes_and_the_training_set_unmixed(tmp_path, probe_collate_fn):
    callback = StiffnessCallback(
        samples_per_class=2, log_images=False, num_bootstrap=0, dataset_every_n_epochs=1,
        probe_collate_fn=probe_collate_fn,
    )  # fmt: skip
    data = LateData(mixup)
    model = _fit(tmp_path, [callback], data, max_epochs=1)
    x, y = data.train_set.tensors
    probe = callback._probe_sets.sets["train"]
    assert torch.equal(probe.inputs, x[probe.indices]) and torch.equal(probe.labels, y[probe.indices])
    raw = raw_results(tmp_path / "lightning_logs" / "version_0")
    measured = raw["dataset-epoch=0-step=4.pt"]["class_matrix"]  # after the last step: the trained model's
    expected = dataset_class_stiffness(model.eval(), DataLoader(data.train_set, batch_size=50), 10)
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_a_probe_collate_fn_that_is_not_callable_is_refused_naming_it():
    with pytest.raises(MisconfigurationException, match="probe_collate_fn"):
        StiffnessCallback(probe_collate_fn=3)
