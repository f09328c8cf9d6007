"""The callback on real batches: dict items of different lengths with a padding collate, a module without
``forward``, ``forward_fn``, and true bf16/float64 precision; probe values against a float64 loop."""

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import MODEL
from tests.helpers import raw_results, trainer
from tests.models.transformer import RecurrentSentenceEncoder, SentenceEncoder
from tests.reference import reference_gradients

VOCAB, PAD, CLASSES = 12, 0, 3


class Sentences(Dataset):
    """Items ``{"input_ids": [L], "labels": int}`` of lengths 3 to 7; the class shifts which tokens are common."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(size) % CLASSES
        self.items = []
        for label in self.labels.tolist():
            length = int(torch.randint(3, 8, (1,), generator=generator))
            tokens = 1 + (torch.randint(0, VOCAB - 1, (length,), generator=generator) + 3 * label) % (VOCAB - 1)
            self.items.append(tokens)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.items[index], "labels": int(self.labels[index])}


def pad(items: list[dict]) -> dict:
    ids = nn.utils.rnn.pad_sequence([item["input_ids"] for item in items], batch_first=True, padding_value=PAD)
    return {"input_ids": ids, "attention_mask": ids != PAD, "labels": torch.tensor([item["labels"] for item in items])}


class SentenceData(LightningDataModule):
    def setup(self, stage: str) -> None:
        self.train, self.val = Sentences(24, 1), Sentences(12, 2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=6, collate_fn=pad)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=6, collate_fn=pad)


class SentenceModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = SentenceEncoder(VOCAB, PAD, CLASSES)

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.encoder(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoForward(SentenceModule):
    """The network lives in ``self.encoder``; the module itself has no ``forward``."""

    forward = LightningModule.forward


def _reference_cosine(network: nn.Module, x: dict, y: torch.Tensor) -> torch.Tensor:
    """Cosine stiffness from one float64 autograd call per (padded) probe example."""
    g = reference_gradients(
        network, x, y, forward_fn=lambda m, xi: m(xi["input_ids"], xi["attention_mask"]), float64_copy=True
    )
    unit = g / g.norm(dim=1, keepdim=True)
    return unit @ unit.T


def _fit(tmp_path, module, **callback_options):
    callback = StiffnessCallback(samples_per_class=3, seed=0, log_images=False, **callback_options)
    trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2).fit(module, datamodule=SentenceData())
    return callback


def _check_against_loop(callback, network, atol):
    probe = callback._probes.sets["train"]
    assert set(probe.inputs) == {"input_ids", "attention_mask"}  # the collate's padding and mask reached the model
    assert (~probe.inputs["attention_mask"]).any(), "the probe examples should include padded ones"
    got = callback.last_result.classes["train-train"]["cosine"][MODEL].stiffness.double()
    want = _reference_cosine(network, probe.inputs, probe.labels)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_dict_items_of_different_lengths_are_padded_by_the_loaders_collate(tmp_path):
    module = SentenceModule()
    callback = _fit(tmp_path, module)
    assert callback.last_result is not None and callback.last_result.epoch == 0
    _check_against_loop(callback, module.encoder, atol=1e-5)


def test_a_module_without_forward_needs_forward_fn(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"has no `forward`.*forward_fn"):
        _fit(tmp_path, NoForward())
    module = NoForward()
    callback = _fit(tmp_path, module, forward_fn=lambda m, x: m.encoder(**x))
    _check_against_loop(callback, module.encoder, atol=1e-5)


@pytest.mark.parametrize("precision, atol", [("64-true", 1e-10), ("bf16-true", 0.06)])
def test_true_precisions_probe_and_match_float64(tmp_path, precision, atol):
    module = SentenceModule()
    callback = StiffnessCallback(samples_per_class=3, seed=0, log_images=False, probe_at_start=False)
    run = trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, precision=precision)
    run.fit(module, datamodule=SentenceData())
    assert callback._probes_done == 1
    expected = torch.float64 if precision == "64-true" else torch.float32  # bf16 accumulates in float32
    assert callback.last_result.classes["train-train"]["cosine"][MODEL].stiffness.dtype == expected
    # The reference runs a float64 copy of the trained (bf16 or float64) weights on the same padded examples.
    _check_against_loop(callback, module.encoder, atol=atol)


def test_a_batch_the_engines_cannot_slice_names_the_entry(tmp_path):
    def with_names(batch):
        return {"input_ids": batch["input_ids"], "source": ["web"] * len(batch["labels"])}, batch["labels"]

    with pytest.raises(MisconfigurationException, match=r"x\['source'\].*must be a tensor"):
        _fit(tmp_path, SentenceModule(), batch_to_xy=with_names)


class RecurrentModule(SentenceModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = RecurrentSentenceEncoder(VOCAB, PAD, CLASSES)


def _raw_run(tmp_path, module_class, **trainer_options):
    seed_everything(0)
    callback = StiffnessCallback(samples_per_class=2, seed=0, log_images=False, every_n_epochs=0)
    trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, **trainer_options).fit(
        module_class(), datamodule=SentenceData()
    )
    (run_dir,) = sorted(tmp_path.glob("lightning_logs/version_*"))
    (raw,) = raw_results(run_dir).values()
    return raw


@pytest.mark.parametrize("module_class", [SentenceModule, RecurrentModule])
def test_ddp_probe_of_dict_batches_equals_one_process(tmp_path, module_class):
    """Dict inputs under 2-process DDP: token terms gathered across processes, the GRU's loop engine on each."""
    single = _raw_run(tmp_path / "single", module_class)
    ddp = _raw_run(tmp_path / "ddp", module_class, strategy="ddp_spawn", accelerator="cpu", devices=2)
    single, ddp = StiffnessResult.from_dict(single), StiffnessResult.from_dict(ddp)
    assert single.pairs == ddp.pairs and single.pairs
    for pair, by_kind in single.classes.items():
        for kind, by_layer in by_kind.items():
            matrix = by_layer[MODEL].stiffness
            torch.testing.assert_close(ddp.classes[pair][kind][MODEL].stiffness, matrix, rtol=1e-5, atol=1e-5)
