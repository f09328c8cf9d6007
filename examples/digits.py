"""Train the networks of Fort et al. (arXiv 1901.09491) with StiffnessCallback, from the command line.

By default on scikit-learn's bundled 8x8 digits: nothing is downloaded. MNIST, Fashion-MNIST or CIFAR-10 files that
torchvision saved on disk earlier can be used instead (``--data.dataset mnist --data.data_dir ~/data``); torchvision
itself is not needed.

    python examples/digits.py fit --config examples/configs/fc.yaml
    python examples/digits.py fit --config examples/configs/cnn.yaml --trainer.max_epochs 10
    python examples/digits.py fit --help

A bad value or a misspelt option is reported in one short message that names the option (exit code 2);
``JSONARGPARSE_DEBUG=true`` shows jsonargparse's full message and the traceback instead.
"""

import ast
import difflib
import gzip
import importlib
import inspect
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# Imported so that `--trainer.callbacks.help StiffnessCallback` finds it by its short name too, and for the names
# of its arguments in the short messages.
from lightning_stiffness import StiffnessCallback

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


# ------------------------------------------------------------------------------------- short messages, plain help

#: Sphinx roles (:func:`x`, :py:class:`~a.b`) and inline literals (``x``), shown as `x` in the help.
_ROLE = re.compile(r":(?:[\w-]+:)+`(~?)([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", flags=re.DOTALL)
_DEBUG = "JSONARGPARSE_DEBUG"


def plain(text: str) -> str:
    """``text`` without Sphinx markup: a role's target (its last part after ``~``) and literals in single quotes."""
    text = _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    return _LITERAL.sub(r"`\1`", text)


def debugging() -> bool:
    """Whether jsonargparse's debug mode is on (``JSONARGPARSE_DEBUG=true``): full messages and tracebacks."""
    return os.environ.get(_DEBUG, "").lower() == "true"


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the docstrings' Sphinx markup (Lightning's own included) removed."""

    def _expand_help(self, action) -> str:
        return plain(super()._expand_help(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))


def _type_name(text: str) -> str:
    """A type as jsonargparse writes it (``<class 'int'>``, ``typing.Literal['a', 'b']``), as a user writes it."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text.strip())
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text)
    if literal:
        return "one of " + literal[1]
    return re.sub(r"\b(?:typing|[a-z_]\w*(?:\.[a-z_]\w*)*)\.(?=[A-Za-z_])", "", text).replace("NoneType", "null")


def _tree(lines: list[str]) -> list[tuple[str, list]]:
    """jsonargparse's indented message as (line, children) nodes."""
    nodes: list[tuple[str, list]] = []
    while lines:
        head, lines = lines[0], lines[1:]
        depth = len(head) - len(head.lstrip())
        size = next((i for i, line in enumerate(lines) if len(line) - len(line.lstrip()) <= depth), len(lines))
        nodes.append((head.strip(), _tree(lines[:size])))
        lines = lines[size:]
    return nodes


def _suggestion(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _parameters(class_path: str) -> list[str]:
    try:
        module, name = class_path.rsplit(".", 1)
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except Exception:  # a name the message gives, not necessarily importable: no suggestion then
        return []


def _list_index(given: str, class_path: str) -> str:
    """``[i]``: the index of the entry of class ``class_path`` in the list jsonargparse shows as the given value."""
    try:
        value = ast.literal_eval(given)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(value, list):
        return ""
    found = [i for i, item in enumerate(value) if isinstance(item, dict) and item.get("class_path") == class_path]
    return f"[{found[0]}]" if found else ""


def _condense(nodes: list[tuple[str, list]], path: str, class_path: str | None = None) -> tuple[str, str]:
    """(option, problem) from the nodes of a jsonargparse message: the innermost key and what was expected."""
    if not nodes:
        return path, "invalid value"
    head, children = nodes[0]
    join = f"{path}." if path else ""
    key = re.fullmatch(r'Parser key "(.+?)":(.*)', head)
    if key:
        inner = ([(key[2].strip(), [])] if key[2].strip() else []) + children
        return _condense(inner, join + key[1])
    option = re.fullmatch(r"Option '(.+)' is not accepted", head)
    if option:
        where = f" of {class_path}" if class_path else ""
        return join + option[1], f"no such option{where}" + _suggestion(option[1], _parameters(class_path or ""))
    expected = re.fullmatch(r"Expected an? (.+?)(?:\. Got value: (.*))?", head)
    if expected:
        got = f", got {expected[2]}" if expected[2] is not None else ""
        return path, f"expected {_type_name(expected[1])}{got}"
    if head == "Does not validate against any of the Union subtypes":
        fields = dict(nodes)
        given = next((line.split(": ", 1)[1] for line, _ in nodes if line.startswith("Given value: ")), "")
        items = [(line[2:], sub) for line, sub in fields.get("Errors:", []) if line.startswith("- ")]
        for line, sub in items:
            chosen = re.fullmatch(r"Problem with given class_path '(.+)':", line)
            if chosen:
                return _condense(sub, f"{path}{_list_index(given, chosen[1])}.init_args", chosen[1])
        kinds = [re.fullmatch(r"Expected an? (.+?)(?:\. Got value: (.*))?", line) for line, _ in items]
        if items and all(kinds):
            # A value inside the one given (an item of a list): what that item should have been.
            inner = [k for k in kinds if k is not None and k[2] is not None and k[2] != given]
            got = f"{inner[0][2]} in {given}" if inner else given
            return path, f"expected {' or '.join(_type_name(k[1]) for k in inner or kinds if k)}, got {got}"
        useful = [(line, sub) for line, sub in items if "NoneType" not in line]
        if useful:
            return _condense(useful[:1], path, class_path)
    return path, head


def short_message(message: str, parser: LightningArgumentParser) -> str:
    """jsonargparse's message (often dozens of lines) as one line that names the option and what was expected."""
    unknown = re.fullmatch(r"unrecognized arguments: (.*)", message.strip(), flags=re.DOTALL)
    options = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
    if unknown:
        names = [arg.split("=", 1)[0] for arg in unknown[1].split() if arg.startswith("-")] or [unknown[1]]
        return "; ".join(f"{name}: no such option{_suggestion(name, options)}" for name in names)
    subcommand = re.fullmatch(r"Subcommand '(.+)' does not accept option '(.+)'", message.strip())
    if subcommand:
        found = _suggestion(f"--{subcommand[2]}", options).replace("--", "")
        return f"{subcommand[2]}: no such option of '{subcommand[1]}'{found}"
    option, problem = _condense(_tree(message.strip().splitlines()), "")
    return f"{option}: {problem}" if option else problem


class ShortMessageParser(LightningArgumentParser):
    """LightningCLI's parser, with errors in one short message (no usage text) and help without Sphinx markup.

    `JSONARGPARSE_DEBUG=true` keeps jsonargparse's behaviour: the full message, raised with its traceback.
    """

    def __init__(self, *args: Any, formatter_class: type = PlainHelpFormatter, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {short_message(message, parser)}\n")
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"({prog} --help lists the options; {_DEBUG}=true shows the full error)\n")
        self.exit(2)


def _components(config: Namespace, path: str = "") -> list[tuple[str, str, dict]]:
    """(path, class_path, init_args) of every class given by class path in ``config``, in order."""
    found: list[tuple[str, str, dict]] = []
    if isinstance(config, Namespace) and isinstance(config.get("class_path"), str):
        init_args = config.get("init_args")
        found.append((path, config["class_path"], dict(init_args.items()) if isinstance(init_args, Namespace) else {}))
    items = config.items(branches=True) if isinstance(config, Namespace) else enumerate(config)
    for key, value in items:
        if isinstance(value, (Namespace, list)):
            where = f"{path}[{key}]" if isinstance(config, list) else (f"{path}.{key}" if path else key)
            found += _components(value, where)
    return found


def _same_arguments(instance: object, init_args: dict) -> bool:
    try:
        return all(getattr(instance, name, value) == value for name, value in init_args.items())
    except Exception:  # values that do not compare (tensors): undecided
        return False


class DigitsCLI(LightningCLI):
    def __init__(self, *args: Any, parser_class: type = ShortMessageParser, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """As LightningCLI's, with an argument that a class refuses reported as a short parser error naming it."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            if debugging():
                raise
            self._parser(self.subcommand).error(self._refusal(err), err)

    def _run_subcommand(self, subcommand: str) -> None:
        """As LightningCLI's, with a run the callback refuses when training starts (a mean loss, a loss that cannot
        take the outputs) reported as one short message naming its option, as a bad value is when parsing."""
        try:
            super()._run_subcommand(subcommand)
        except MisconfigurationException as err:
            message = str(err)
            if debugging() or not message.startswith("StiffnessCallback: "):
                raise
            message = message.removeprefix("StiffnessCallback: ").splitlines()[0]
            config = self.config[self.subcommand] if self.subcommand else self.config
            where = next(
                (path for path, class_path, _ in _components(config) if class_path.endswith(".StiffnessCallback")),
                "trainer.callbacks",
            )
            names = set(inspect.signature(StiffnessCallback.__init__).parameters) - {"self"}
            argument = next((name for name in re.findall(r"`(\w+)`", message) if name in names), None)
            option = f"{where}.init_args.{argument}" if argument and where != "trainer.callbacks" else where
            sys.stderr.write(f"error: {option}: {message}\n")
            sys.exit(2)

    def _refusal(self, err: BaseException) -> str:
        """``option: message`` for an error raised while instantiating: the option of the class that refused."""
        while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
            err = err.__cause__ or err.__context__  # type: ignore[assignment]
        config = self.config[self.subcommand] if self.subcommand else self.config
        # (where, where its arguments are, the arguments given, the class)
        classes = {"trainer": self.trainer_class, "model": self._model_class, "data": self._datamodule_class}
        given = [(key, key, dict(config.get(key, Namespace()).items()), cls) for key, cls in classes.items()]
        for path, class_path, init_args in _components(config):
            module, _, name = class_path.rpartition(".")
            try:
                given.append((path, f"{path}.init_args", init_args, getattr(importlib.import_module(module), name)))
            except (ImportError, AttributeError):
                continue
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        for instance in _initialised(err):
            matches = [g for g in given if g[3] is type(instance)]
            if not matches:
                continue
            path, arguments, init_args, cls = next((g for g in matches if _same_arguments(instance, g[2])), matches[0])
            message = message.removeprefix(f"{cls.__name__}: ")
            names = set(inspect.signature(cls.__init__).parameters) - {"self"}
            argument = next((name for name in re.findall(r"[`'\"](\w+)", message) if name in names), None)
            return f"{arguments}.{argument}: {message}" if argument else f"{path}: {message}"
        return message


def _initialised(err: BaseException) -> list[object]:
    """The objects whose ``__init__`` the error's traceback passes through, outermost first."""
    instances = []
    traceback = err.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            instances.append(frame.f_locals["self"])
        traceback = traceback.tb_next
    return instances


def main(args: list[str] | None = None, run: bool = True) -> DigitsCLI:
    return DigitsCLI(PaperNet, DigitsDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
