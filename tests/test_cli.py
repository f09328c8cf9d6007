"""The callback configured from YAML through LightningCLI, as users of examples/digits.py do."""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_stiffness import StiffnessCallback
from tests.helpers import raw_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_cli():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("fc.yaml", ["--model.hidden=[32, 16]"]),
        ("cnn.yaml", []),
        ("fc_layers.yaml", ["--model.hidden=[32, 16, 8]", "--trainer.callbacks.init_args.epochs=[0]"]),
        ("fc_groups.yaml", ["--model.hidden=[32, 16]"]),
    ],
)
def test_yaml_config_trains_and_probes(tmp_path, digits_cli, config, overrides):
    cli = digits_cli.main(
        [
            "fit",
            "--config",
            str(ROOT / "examples" / "configs" / config),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.samples_per_class=2",
            *overrides,
        ]
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, StiffnessCallback)]
    assert len(callbacks) == 1 and callbacks[0].samples_per_class == 2
    assert callbacks[0].class_names is None  # the argument as given; the dataset's `classes` are used privately
    assert callbacks[0]._probes.class_names == [str(d) for d in range(10)]
    assert sorted(raw_results(cli.trainer.log_dir)) == ["epoch=0-step=0.pt", "epoch=0-step=3.pt"]


def test_callback_help_lists_every_argument(digits_cli, capsys):
    with pytest.raises(SystemExit):
        digits_cli.main(["fit", "--trainer.callbacks.help", "lightning_stiffness.StiffnessCallback"])
    shown = capsys.readouterr().out
    for name in (
        "samples_per_class",
        "epochs",
        "every_n_epochs",
        "probe_at_start",
        "kinds",
        "method",
        "chunk_size",
        "seed",
        "loss_fn",
        "batch_to_xy",
        "num_distance_bins",
        "save_raw",
        "log_images",
    ):
        assert f"--trainer.callbacks.{name}" in shown, name
    assert "probe examples drawn per class" in shown


def _write_idx(path, array):
    import numpy as np

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_local_mnist_files_are_read_without_torchvision(tmp_path, digits_cli):
    import gzip

    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    # gzipped files are read too
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress((raw / "t10k-labels-idx1-ubyte").read_bytes()))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    data = digits_cli.DigitsDataModule(dataset="mnist", data_dir=str(tmp_path), val_fraction=0.25)
    data.setup("fit")
    assert data.input_shape == [1, 28, 28]
    assert len(data.train_set) == 30 and len(data.val_set) == 10
    assert data.train_set.tensors[0].shape[1:] == (1, 28, 28)
    assert sorted(set(data.train_set.tensors[1].tolist()) | set(data.val_set.tensors[1].tolist())) == list(range(10))


def test_missing_local_files_say_where(tmp_path, digits_cli):
    data = digits_cli.DigitsDataModule(dataset="fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw/train-images-idx3-ubyte"):
        data.setup("fit")
    with pytest.raises(ValueError, match=r"--data\.data_dir is required"):
        digits_cli.DigitsDataModule(dataset="cifar10").setup("fit")


# Functions for the configs below to name by import path, written as users write them: without annotations, so
# jsonargparse cannot check what they return.
def per_example_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def batch_xy(batch):
    x, y = batch
    return x, y


def call_model(model, x):
    return model(x)


SETTINGS = [name for name in inspect.signature(StiffnessCallback.__init__).parameters if name != "self"]


def _settings(cli) -> dict:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, StiffnessCallback)]
    return {name: getattr(callback, name) for name in SETTINGS}


@pytest.mark.parametrize(
    "class_groups", ["[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]", "{low: [0, 1, 2, 3, 4], high: [5, 6, 7, 8, 9]}"]
)
def test_printed_and_saved_configs_reproduce_the_callback(tmp_path, digits_cli, capsys, class_groups):
    """`--print_config` and the config.yaml saved in the log dir write import paths back as given, so fitting with
    either gives a callback with the same settings."""
    callback = "--trainer.callbacks.init_args."
    args = [
        "fit",
        "--config",
        str(ROOT / "examples" / "configs" / "fc_groups.yaml"),
        "--model.hidden=[32, 16]",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"{callback}samples_per_class=2",
        f"{callback}loss_fn=tests.test_cli.per_example_loss",
        f"{callback}batch_to_xy=tests.test_cli.batch_xy",
        f"{callback}forward_fn=tests.test_cli.call_model",
        f"{callback}class_groups={class_groups}",
        f"{callback}layers=[net.2]",
        f"{callback}kinds=[sign, cosine]",
        f"{callback}class_names=[{', '.join(f'digit{d}' for d in range(10))}]",
        f"{callback}epochs=[0]",
        f"{callback}every_n_epochs=null",
        f"{callback}steps=[1]",
    ]
    original = digits_cli.main([*args, f"--trainer.default_root_dir={tmp_path / 'original'}"])
    expected = _settings(original)
    assert expected["loss_fn"] == "tests.test_cli.per_example_loss"
    assert (
        expected["batch_to_xy"] == "tests.test_cli.batch_xy" and expected["forward_fn"] == "tests.test_cli.call_model"
    )
    assert expected["probe_collate_fn"] == "torch.utils.data.default_collate"
    assert expected["class_groups"] == yaml.safe_load(class_groups)
    assert expected["layers"] == ["net.2"] and expected["class_names"] == [f"digit{d}" for d in range(10)]
    assert expected["epochs"] == [0] and expected["steps"] == [1] and expected["every_n_epochs"] is None
    assert list(expected["kinds"]) == ["cosine", "sign"]
    assert sorted(raw_results(original.trainer.log_dir)) == [
        "epoch=0-step=0.pt",
        "epoch=0-step=1.pt",
        "epoch=0-step=2.pt",
    ]

    capsys.readouterr()
    with pytest.raises(SystemExit):
        digits_cli.main([*args, "--print_config"])
    printed = capsys.readouterr().out
    saved = (Path(original.trainer.log_dir) / "config.yaml").read_text()
    for name, text in (("printed", printed), ("saved", saved)):
        assert "Unable to serialize" not in text, name
        init_args = yaml.safe_load(text)["trainer"]["callbacks"][0]["init_args"]
        assert init_args["loss_fn"] == "tests.test_cli.per_example_loss", name
        assert init_args["probe_collate_fn"] == "torch.utils.data.default_collate", name
        assert init_args["class_groups"] == yaml.safe_load(class_groups), name
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        reloaded = digits_cli.main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / name}"])
        assert _settings(reloaded) == expected, name
        assert sorted(raw_results(reloaded.trainer.log_dir)) == sorted(raw_results(original.trainer.log_dir)), name


def test_a_callable_dumps_as_its_import_path():
    """A function set in Python (not parsed from a string) is written as its import path, which parses back."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(StiffnessCallback, "stiffness")
    config = parser.parse_args([])
    config.stiffness.loss_fn = per_example_loss
    config.stiffness.probe_collate_fn = torch.utils.data.default_collate
    dumped = yaml.safe_load(parser.dump(config))["stiffness"]
    assert dumped["loss_fn"] == "tests.test_cli.per_example_loss"
    assert dumped["probe_collate_fn"] == "torch.utils.data.default_collate"
    assert parser.parse_args([f"--stiffness.loss_fn={dumped['loss_fn']}"]).stiffness.loss_fn == dumped["loss_fn"]
