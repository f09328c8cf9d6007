"""Train the networks of Fort et al. (arXiv 1901.09491) with StiffnessCallback, from the command line.

By default on scikit-learn's bundled 8x8 digits: nothing is downloaded. MNIST, Fashion-MNIST or CIFAR-10 files that
torchvision saved on disk earlier can be used instead (``--data.dataset mnist --data.data_dir ~/data``); torchvision
itself is not needed.

    python examples/digits.py fit --config examples/configs/fc.yaml
    python examples/digits.py fit --config examples/configs/cnn.yaml --trainer.max_epochs 10
    python examples/digits.py fit --help
"""

import gzip
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DatasetName = Literal["digits", "mnist", "fashion-mnist", "cifar10"]
_DIGIT_NAMES = [str(d) for d in range(10)]
_FASHION_NAMES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
_CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder / stem}[.gz] not found: point --data.data_dir at torchvision's download folder.")


def load_arrays(dataset: DatasetName, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [N, C, H, W] as float32 and labels [N] as int64, plus class names. Reads local files only."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images[:, None].astype(np.float32), digits.target.astype(np.int64), _DIGIT_NAMES
    if data_dir is None:
        raise ValueError(f"--data.data_dir is required for dataset {dataset!r} (files are never downloaded).")
    root = Path(data_dir).expanduser()
    if dataset in ("mnist", "fashion-mnist"):
        folder = root / ("MNIST" if dataset == "mnist" else "FashionMNIST") / "raw"
        images, labels = [], []
        for prefix in ("train", "t10k"):
            images.append(_read_idx(_find(folder, f"{prefix}-images-idx3-ubyte")))
            labels.append(_read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte")))
        names = _DIGIT_NAMES if dataset == "mnist" else _FASHION_NAMES
        return np.concatenate(images)[:, None].astype(np.float32), np.concatenate(labels).astype(np.int64), names
    folder = root / "cifar-10-batches-py"
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.float32).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels), _CIFAR_NAMES


class ClassNamedDataset(TensorDataset):
    """A TensorDataset that carries class names (StiffnessCallback labels its plots with them)."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str]) -> None:
        super().__init__(images, labels)
        self.classes = classes


class DigitsDataModule(LightningDataModule):
    """Bundled digits (or local MNIST / Fashion-MNIST / CIFAR-10 files), standardised, with a fixed validation split.

    Args:
        dataset: which data set: ``digits`` (scikit-learn's, bundled), ``mnist``, ``fashion-mnist``, ``cifar10``.
        data_dir: the folder torchvision downloaded into earlier (holding ``MNIST/raw``, ``FashionMNIST/raw`` or
            ``cifar-10-batches-py``); unused for digits.
        val_fraction: share of the examples held out for validation.
        batch_size: training and validation batch size.
        split_seed: seed of the train/validation split (fixed, independent of the training seed).
        max_examples: keep only this many examples (a random subset), for quick runs on the larger data sets.
    """

    def __init__(
        self,
        dataset: DatasetName = "digits",
        data_dir: str | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        split_seed: int = 0,
        max_examples: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.dataset, self.data_dir = dataset, data_dir
        self.val_fraction, self.batch_size, self.split_seed = val_fraction, batch_size, split_seed
        self.max_examples = max_examples
        self._shape = {"digits": [1, 8, 8], "mnist": [1, 28, 28], "fashion-mnist": [1, 28, 28], "cifar10": [3, 32, 32]}

    @property
    def input_shape(self) -> list[int]:
        return self._shape[self.dataset]

    @property
    def num_classes(self) -> int:
        return 10

    def setup(self, stage: str) -> None:
        images, labels, names = load_arrays(self.dataset, self.data_dir)
        order = np.random.default_rng(self.split_seed).permutation(len(labels))
        if self.max_examples is not None:
            order = order[: self.max_examples]
        n_val = round(self.val_fraction * len(order))
        val_idx, train_idx = order[:n_val], order[n_val:]
        # Standardise with the training split's statistics, per channel.
        mean = images[train_idx].mean(axis=(0, 2, 3), keepdims=True)
        std = images[train_idx].std(axis=(0, 2, 3), keepdims=True) + 1e-6
        images = (images - mean) / std
        self.train_set = ClassNamedDataset(
            torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]), names
        )
        self.val_set = ClassNamedDataset(torch.from_numpy(images[val_idx]), torch.from_numpy(labels[val_idx]), names)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def fully_connected(input_shape: list[int], hidden: list[int], num_classes: int) -> nn.Sequential:
    """The paper's fully connected net: flatten, then Linear + ReLU per hidden width, then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(np.prod(input_shape))
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(input_shape: list[int], channels: list[int], num_classes: int) -> nn.Sequential:
    """The paper's small CNN: 3x3 convolutions with ReLU, 2x2 max-pooling after the first two, a linear classifier."""
    layers: list[nn.Module] = []
    in_channels, side = input_shape[0], input_shape[1]
    for i, out_channels in enumerate(channels):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
        if i < 2 and side >= 2:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        in_channels = out_channels
    layers += [nn.Flatten(), nn.Linear(in_channels * side * side, num_classes)]
    return nn.Sequential(*layers)


class PaperNet(LightningModule):
    """A classifier with the paper's architectures, trained with cross-entropy.

    Args:
        arch: ``fc`` (hidden widths ``hidden``, ReLU) or ``cnn`` (3x3 convolutions with ``channels``).
        hidden: widths of the fully connected net's hidden layers.
        channels: channels of the CNN's convolutions.
        optimizer: ``adam`` or ``sgd``.
        lr: learning rate.
        input_shape: shape of one input (C, H, W); linked from the data module.
        num_classes: number of classes; linked from the data module.
    """

    def __init__(
        self,
        arch: Literal["fc", "cnn"] = "fc",
        hidden: list[int] = [500, 300, 100],  # noqa: B006 -- shown as the default in --help; never mutated.
        channels: list[int] = [16, 32, 32],  # noqa: B006
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        input_shape: list[int] = [1, 8, 8],  # noqa: B006
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "fc":
            self.net = fully_connected(input_shape, hidden, num_classes)
        else:
            self.net = small_cnn(input_shape, channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> DigitsCLI:
    return DigitsCLI(PaperNet, DigitsDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
