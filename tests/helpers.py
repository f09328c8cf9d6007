"""A small digits setup for callback tests: scikit-learn's bundled digits, nothing downloaded."""

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.names import PREFIX, class_matrix_tag

#: A raw file of format version 1, written by the code before version 2 (TinyNet on digits, 2 examples a class,
#: ``per_layer``, ``layers=["net.1"]``, class groups, 20 bootstrap draws), and the scalars that code logged for it.
FIXTURE_V1 = Path(__file__).parent / "data" / "raw_format_v1.pt"
FIXTURE_V1_SCALARS = Path(__file__).parent / "data" / "raw_format_v1_scalars.json"


def digits_tensors(n: int = 400):
    digits = load_digits()
    x = torch.tensor(digits.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:n], dtype=torch.long)
    return x, y


class DictDataset(Dataset):
    """Items as dicts, the layout of many tokenised or image datasets."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class DigitsData(LightningDataModule):
    def __init__(self, n: int = 400, batch_size: int = 32, dict_items: bool = False, float_labels: bool = False):
        super().__init__()
        x, y = digits_tensors(n)
        if float_labels:
            y = y.float()
        split = int(0.75 * n)
        make = DictDataset if dict_items else TensorDataset
        self.train_set, self.val_set = make(x[:split], y[:split]), make(x[split:], y[split:])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TinyNet(LightningModule):
    def __init__(self, dropout: float = 0.0, lr: float = 0.05, nan_after_epoch: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 10))
        self.lr = lr
        self.nan_after_epoch = nan_after_epoch

    def forward(self, x):
        out = self.net(x.flatten(1))
        if self.nan_after_epoch is not None and not self.training and self.current_epoch >= self.nan_after_epoch:
            out = out * float("nan")  # a model gone bad, seen only by the probe (which runs in eval mode)
        return out

    def _batch(self, batch):
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch

    def training_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        loss = nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        self.log("val_loss", nn.functional.cross_entropy(self.net(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(tmp_path: Path, callbacks, **kwargs) -> Trainer:
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=4,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def events(log_dir: Path) -> EventAccumulator:
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def raw_results(log_dir: Path, prefix: str = PREFIX) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((Path(log_dir) / prefix).glob("*.pt"))}


# Shared by the image tests (test_images, test_loggers, test_render_worker, test_schedule).
CLASS_MATRIX_TAG = class_matrix_tag("train-val", "cosine")


def _callback(**kwargs) -> StiffnessCallback:
    options = dict(samples_per_class=2, num_bootstrap=0, kinds=["cosine"])
    options.update(kwargs)
    return StiffnessCallback(**options)


def _image_steps(log_dir, tag=CLASS_MATRIX_TAG) -> list[int]:
    accumulator = events(log_dir)
    if tag not in accumulator.Tags()["images"]:
        return []
    return [event.step for event in accumulator.Images(tag)]


def _stiffness_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "Stiffness" in str(w.message)]
