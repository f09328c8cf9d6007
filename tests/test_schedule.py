"""Step schedules (alone and with epochs, never a step twice, each probe's images once), the same callback probing in a
second fit as in the first, monitors that find the latest stiffness at every check, and a quiet callback: no
progress-bar escape codes or text off a terminal, its own message first in LightningCLI errors."""

import importlib.util
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.callback.progress import progress_bar
from lightning_stiffness.callback.schedule import ProbeSchedule
from lightning_stiffness.names import MODEL, class_tag
from tests.helpers import DigitsData, TinyNet, _callback, _image_steps, events, raw_results, trainer

TAG = class_tag("train-val", "cosine", "within")


def _probed_steps(tmp_path, **kwargs):
    callback = StiffnessCallback(samples_per_class=2, log_images=False, kinds=["cosine"], **kwargs)
    fit = trainer(tmp_path, [callback], max_epochs=2)
    fit.fit(TinyNet(), datamodule=DigitsData())
    return sorted(raw_results(fit.log_dir)), [e.step for e in events(fit.log_dir).Scalars(TAG)]


def test_every_n_steps_alone(tmp_path):
    files, steps = _probed_steps(tmp_path, every_n_steps=3)
    assert steps == [0, 3, 6]  # no epoch-end probes unless asked for
    assert files == ["epoch=0-step=0.pt", "epoch=0-step=3.pt", "epoch=1-step=6.pt"]


def test_steps_with_the_epoch_schedule_never_twice(tmp_path):
    files, steps = _probed_steps(tmp_path, steps=[1, 2, 4], every_n_epochs=1)
    assert steps == [0, 1, 2, 4, 8]  # step 4 ends epoch 0: probed once
    assert "epoch=0-step=4.pt" in files and len(files) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": [0, 5]}, "`steps` must be a positive integer"),
        ({"steps": []}, "`steps` must be a non-empty list"),
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive integer"),
        ({"epochs": [1], "every_n_epochs": 2}, "either `epochs` or `every_n_epochs`"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        StiffnessCallback(**kwargs)


def test_schedule_defaults():
    assert ProbeSchedule(None, None, None, None).every_n_epochs == 1
    assert ProbeSchedule(None, None, [10], None).every_n_epochs == 0
    assert ProbeSchedule(None, 2, None, 5).every_n_epochs == 2
    schedule = ProbeSchedule([0, 3], None, None, 7)
    assert [s for s in range(1, 30) if schedule.due_at_step(s)] == [7, 14, 21, 28]
    assert [e for e in range(5) if schedule.due_at_epoch_end(e, 100 + e)] == [0, 3]


@pytest.mark.parametrize(
    "schedule, check_on_train_epoch_end",
    [
        ({}, None),  # validation twice an epoch: EarlyStopping checks after each validation
        ({}, True),
        ({"every_n_epochs": 2}, None),  # epochs without a probe
        ({"every_n_epochs": 2}, True),
        ({"every_n_steps": 3}, False),
    ],
)
def test_monitors_find_the_latest_values_at_every_check(tmp_path, schedule, check_on_train_epoch_end):
    stop = EarlyStopping(monitor=TAG, mode="max", patience=100, check_on_train_epoch_end=check_on_train_epoch_end)
    best = ModelCheckpoint(monitor=TAG, mode="max", every_n_epochs=2, save_top_k=1)
    callback = StiffnessCallback(samples_per_class=2, log_images=False, **schedule)
    fit = trainer(tmp_path, [callback, stop, best], max_epochs=4, val_check_interval=0.5)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert fit.current_epoch == 4  # ran to the end, no "metric not available"
    assert best.best_model_score is not None and TAG in fit.callback_metrics
    assert fit.callback_metrics[TAG] == pytest.approx(callback.last_result.classes["train-val"]["cosine"][MODEL].within)


def test_no_progress_bar_off_a_terminal(capsys):
    with progress_bar(True, "probe") as update:
        assert update is None  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_cli_error_shows_the_callbacks_message_first(tmp_path, monkeypatch):
    """By default the message is one short line naming the option (tests/test_cli.py); in jsonargparse's debug
    mode the error is raised, and the callback's own exception comes first in its chain."""
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("digits_example_quiet", root / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_example_quiet"] = module
    spec.loader.exec_module(module)
    args = ["fit", "--config", str(root / "examples" / "configs" / "fc.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises((ValueError, TypeError)) as caught:  # jsonargparse's error, caused by the callback's
        module.main([*args, "--trainer.callbacks.init_args.samples_per_class=0"])
    chain, error = [], caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    first = chain[-1]  # the first exception of the chain, which a traceback prints first
    assert isinstance(first, MisconfigurationException)
    assert str(first).startswith("StiffnessCallback: `samples_per_class` must be an integer >= 2, got 0.")


# --------------------------------------------------------------------------------------------------- with images


@pytest.mark.parametrize(
    "run, schedule, probed",
    [
        ({"max_epochs": -1, "max_steps": 6}, {"every_n_steps": 3}, [0, 3, 6]),
        ({"max_epochs": -1, "max_steps": 6}, {"every_n_steps": 4, "every_n_epochs": 1}, [0, 4, 6]),
        ({"max_epochs": 1}, {"steps": [2, 100]}, [0, 2]),  # a step beyond the run: simply never reached
        ({"max_epochs": 2, "accumulate_grad_batches": 2}, {"every_n_steps": 1, "every_n_epochs": 1}, [0, 1, 2, 3, 4]),
        ({"max_epochs": 2, "val_check_interval": 0.5}, {"steps": [2, 4], "every_n_epochs": 1}, [0, 2, 4, 8]),
    ],
)
def test_step_schedules_probe_each_step_once_with_images(tmp_path, run, schedule, probed):
    fit = trainer(tmp_path, [_callback(**schedule)], **run)
    fit.fit(TinyNet(), datamodule=DigitsData())
    steps = [event.step for event in events(fit.log_dir).Scalars(class_tag("train-val", "cosine", "within"))]
    assert steps == probed
    assert len(raw_results(fit.log_dir)) == len(probed)
    assert _image_steps(fit.log_dir) == probed


def test_monitors_with_every_n_epochs_and_checks_after_validation(tmp_path):
    tag = class_tag("train-val", "cosine", "within")
    stop = EarlyStopping(monitor=tag, mode="max", patience=100, check_on_train_epoch_end=False)
    best = ModelCheckpoint(monitor=tag, mode="max", every_n_epochs=2, save_top_k=1)
    callback = _callback(every_n_epochs=2, log_images=False)
    fit = trainer(tmp_path, [callback, stop, best], max_epochs=4, val_check_interval=0.5)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert fit.current_epoch == 4
    assert best.best_model_score is not None
    within = callback.last_result.classes["train-val"]["cosine"][MODEL].within
    assert float(fit.callback_metrics[tag]) == pytest.approx(within)


def test_no_progress_bar_text_off_a_terminal(tmp_path, capfd):
    fit = trainer(tmp_path, [_callback(log_images=False)], max_epochs=1, enable_progress_bar=True)
    fit.fit(TinyNet(), datamodule=DigitsData())
    captured = capfd.readouterr()
    assert "Stiffness probe" not in captured.err + captured.out


def test_same_callback_in_a_second_fit_probes_as_in_the_first(tmp_path):
    callback = _callback(probe_at_start=False)
    first = trainer(tmp_path, [callback], max_epochs=1)
    first.fit(TinyNet(), datamodule=DigitsData())
    assert sorted(raw_results(first.log_dir)) == ["epoch=0-step=4.pt"]
    second = trainer(tmp_path, [callback], max_epochs=1)
    second.fit(TinyNet(), datamodule=DigitsData())
    assert second.log_dir != first.log_dir
    assert sorted(raw_results(second.log_dir)) == ["epoch=0-step=4.pt"]  # the same schedule, a new run
    assert _image_steps(second.log_dir) == [4]
