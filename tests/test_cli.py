"""The callback configured from YAML through LightningCLI, as users of examples/digits.py do."""

import importlib.util
import inspect
import os
import subprocess
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


# ------------------------------------------------------------------------- short messages, plain help, other loggers

FC = str(ROOT / "examples" / "configs" / "fc.yaml")
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false"]
CALLBACK = "--trainer.callbacks.init_args."


def _digits(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`python examples/digits.py ARGS` in its own process, stdout and stderr together."""
    environment = {k: v for k, v in os.environ.items() if k != "JSONARGPARSE_DEBUG"}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "digits.py"), *args],
        cwd=cwd,
        env={**environment, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


#: (what is wrong, the arguments after `fit --config fc.yaml`, the option the message names, what else it says)
BAD = {
    "refused by __init__": (
        [f"{CALLBACK}every_n_epochs=-1"],
        "trainer.callbacks[0].init_args.every_n_epochs: ",
        "non-negative integer, got -1",
    ),
    "refused by __init__, small": ([f"{CALLBACK}samples_per_class=1"], "init_args.samples_per_class: ", ">= 2"),
    "unknown kind": ([f"{CALLBACK}kinds=[cosine, curl]"], "init_args.kinds: ", "'cosine', 'sign', got curl"),
    "unknown method": ([f"{CALLBACK}method=fast"], "init_args.method: ", "'factored'"),
    "not an int": ([f"{CALLBACK}every_n_epochs=often"], "init_args.every_n_epochs: ", "expected int or null"),
    "misspelt callback option": ([f"{CALLBACK}every_n_epoch=1"], "every_n_epoch: ", "did you mean every_n_epochs?"),
    "misspelt trainer option": (["--trainer.max_epohcs=1"], "--trainer.max_epohcs: ", "--trainer.max_epochs?"),
    "model value": (["--model.lr=fast"], "model.lr: ", "expected float, got fast"),
    "data value refused by __init__": (["--data.val_fraction=2"], "data.val_fraction: ", "(0, 1)"),
    "mean loss, refused when training starts": (
        [f"{CALLBACK}loss_fn=torch.nn.functional.cross_entropy"],
        "trainer.callbacks[0].init_args.loss_fn: ",
        'returned (). Use `reduction="none"`',
    ),
    "loss class for an instance": (
        [f"{CALLBACK}loss_fn=torch.nn.CrossEntropyLoss"],
        "init_args.loss_fn: ",
        "is the class torch.nn.modules.loss.CrossEntropyLoss",
    ),
    "loss path of a module": ([f"{CALLBACK}loss_fn=torch.nn.functional"], "init_args.loss_fn: ", "is a module"),
    "config: refused by __init__": (
        ["--config", "bad_value.yaml"],
        "trainer.callbacks[0].init_args.every_n_epochs: ",
        "got -1",
    ),
    "config: misspelt option": (
        ["--config", "misspelt.yaml"],
        "trainer.callbacks[0].init_args.every_n_epoch: ",
        "did you mean every_n_epochs?",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every run of BAD started at once (each spends seconds importing torch), then their exit codes and outputs."""
    folder = tmp_path_factory.mktemp("bad")
    config = Path(FC).read_text()
    (folder / "bad_value.yaml").write_text(config.replace("every_n_epochs: 1", "every_n_epochs: -1"))
    (folder / "misspelt.yaml").write_text(config.replace("every_n_epochs: 1", "every_n_epoch: 1"))
    started = {
        name: _digits(["fit", "--config", FC, f"--trainer.default_root_dir={folder}", *QUICK, *args], folder)
        for name, (args, _, _) in BAD.items()
    }
    started["debug"] = _digits(
        ["fit", "--config", FC, *QUICK, f"{CALLBACK}every_n_epochs=-1"], folder, **{"JSONARGPARSE_DEBUG": "true"}
    )
    return {name: (process.wait(timeout=300), process.communicate()[0]) for name, process in started.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_or_option_is_one_short_message(bad_runs, case):
    _, option, says = BAD[case]
    code, output = bad_runs[case]
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    if "training starts" in case:  # after Lightning's own lines of a run starting, the message ends the output
        assert lines[-1].startswith("error: "), output
    else:
        assert len(lines) <= 5, output
    assert "Traceback" not in output and "usage:" not in output, output
    (message,) = [line for line in lines if line.startswith("error: ")]
    assert option in message and says in message, output


def test_jsonargparse_debug_shows_the_traceback(bad_runs):
    code, output = bad_runs["debug"]
    assert code != 0 and "Traceback" in output and "must be a non-negative integer, got -1" in output


#: Sphinx markup, and the Tensor subclasses jsonargparse listed for a callable that returns a Tensor.
NOT_PLAIN = [":func:", ":class:", ":attr:", ":mod:", ":math:", "``", "known subclasses", "FloatTensor", "Parameter"]


@pytest.mark.parametrize("name", ["StiffnessCallback", "lightning_stiffness.StiffnessCallback"])
def test_callback_help_is_plain_text(digits_cli, capsys, name):
    with pytest.raises(SystemExit) as exit_:
        digits_cli.main(["fit", "--trainer.callbacks.help", name])
    shown = capsys.readouterr().out
    assert exit_.value.code in (0, None)
    assert "--trainer.callbacks.loss_fn LOSS_FN" in shown and "--trainer.callbacks.loss_fn.help" not in shown
    assert "see `lightning_stiffness.gram.gradient_gram`" in " ".join(shown.split())  # a Sphinx role's target
    for markup in NOT_PLAIN:
        assert markup not in shown, markup


def test_fit_help_is_plain_text(digits_cli, capsys):
    """Lightning's own docstrings (the Trainer's) are shown without their markup too."""
    with pytest.raises(SystemExit):
        digits_cli.main(["fit", "--help"])
    shown = capsys.readouterr().out
    assert "--trainer.max_epochs" in shown
    for markup in NOT_PLAIN[:6]:
        assert markup not in shown, markup


def test_wandb_and_mlflow_loggers_from_the_command_line(tmp_path):
    """The README's lines: W&B offline and MLflow's file store, chosen with --trainer.logger, write their runs."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    logger = "lightning.pytorch.loggers."
    fast = [*QUICK, f"{CALLBACK}samples_per_class=2"]
    wandb = _digits(
        ["fit", "--config", FC, f"--trainer.logger={logger}WandbLogger", "--trainer.logger.save_dir=runs/wandb", *fast],
        tmp_path,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )
    mlflow_store = "--trainer.logger.tracking_uri=file:./runs/mlruns"
    mlflow = _digits(
        ["fit", "--config", FC, f"--trainer.logger={logger}MLFlowLogger", mlflow_store, *fast],
        tmp_path,
        MLFLOW_ALLOW_FILE_STORE="true",
    )
    for process in (wandb, mlflow):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-4000:]
    (run,) = (tmp_path / "runs" / "wandb" / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))
    assert sorted(p.name for p in run.glob("files/stiffness/*.pt")) == ["epoch=0-step=0.pt", "epoch=0-step=3.pt"]
    (run,) = [meta.parent for meta in (tmp_path / "runs" / "mlruns").glob("*/*/meta.yaml")]
    assert (run / "metrics" / "stiffness").is_dir()
    assert sorted(p.name for p in run.glob("artifacts/stiffness/*.pt")) == ["epoch=0-step=0.pt", "epoch=0-step=3.pt"]
