"""A reviewer's attempts to break images (drawn off the training process, flushed at the end and on exceptions, in
every logger), step schedules and monitors: every case asserts files and values, never durations."""

import io
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.images.drawing import CurveSpec, Line, MatrixSpec, Painter
from lightning_stiffness.names import MODEL, class_matrix_tag, class_tag, distance_curve_tag
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer

ROOT = Path(__file__).resolve().parents[1]
TAG = class_matrix_tag("train-val", "cosine")
WORKER = "lightning_stiffness.images.drawing import serve"


def _callback(**kwargs) -> StiffnessCallback:
    options = dict(samples_per_class=2, num_bootstrap=0, kinds=["cosine"])
    options.update(kwargs)
    return StiffnessCallback(**options)


def _image_steps(log_dir, tag=TAG) -> list[int]:
    accumulator = events(log_dir)
    if tag not in accumulator.Tags()["images"]:
        return []
    return [event.step for event in accumulator.Images(tag)]


def _children(pid: int | None = None) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of the direct children of ``pid`` (this process), read from /proc."""
    pid = pid or os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry), fields[0], command))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _workers() -> set[int]:
    return {pid for pid, _, command in _children() if WORKER in command}


def _workers_left(before: set[int], patience_s: float = 60.0) -> set[int]:
    """Render workers started since ``before`` that are still there; a closed worker exits by itself (the callback
    does not wait for it), so give it a while before calling it left over."""
    deadline = time.monotonic() + patience_s
    while (left := _workers() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def system_temp(tmp_path, monkeypatch) -> Path:
    """A private system temp directory, so that `stiffness-images-*` left by this test (and by no other) show."""
    path = tmp_path / "systemp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def _stiffness_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "Stiffness" in str(w.message)]


# ------------------------------------------------------------------------------------- exceptions and interrupts


class _FailsAfterStep(TinyNet):
    def __init__(self, step: int, error: type[BaseException] = RuntimeError):
        super().__init__()
        self.fail_step, self.error = step, error

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.fail_step:
            raise self.error("training broke mid-epoch")
        return super().training_step(batch, batch_idx)


def test_exception_mid_epoch_delivers_every_probes_images_the_last_one_included(tmp_path, system_temp):
    before = _workers()
    csv = CSVLogger(tmp_path, name="csv", version=0)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = _callback(every_n_steps=1, images_every_n_probes=2)
    fit = trainer(tmp_path, [callback], max_epochs=3, logger=[tb, csv])
    with pytest.raises(RuntimeError, match="training broke mid-epoch"):
        fit.fit(_FailsAfterStep(5), datamodule=DigitsData())  # probes after steps 0..5, then step 6 raises
    assert sorted(raw_results(tb.log_dir)) == [f"epoch={s // 5}-step={s}.pt" for s in range(6)]
    assert _image_steps(tb.log_dir) == [0, 2, 4, 5]  # every second probe, and the last, held until the exception
    pngs = sorted(p.name for p in (Path(tb.log_dir) / TAG).glob("*.png"))  # the CSV logger's: files
    assert pngs == ["epoch=0-step=0.png", "epoch=0-step=2.png", "epoch=0-step=4.png", "epoch=1-step=5.png"]
    assert not _workers_left(before)
    assert not list(system_temp.glob("stiffness-images-*"))


def test_keyboard_interrupt_raised_in_training_delivers_images(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    fit = trainer(tmp_path, [_callback(every_n_steps=2)], max_epochs=3)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with sys.exit(1)
            fit.fit(_FailsAfterStep(6, KeyboardInterrupt), datamodule=DigitsData())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
    assert _image_steps(fit.log_dir) == [0, 2, 4, 6]


_CTRL_C_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from lightning_stiffness import StiffnessCallback
from tests.helpers import DigitsData, TinyNet, trainer


class CtrlC(Callback):
    # Ctrl+C at a terminal: SIGINT to the whole foreground process group, just after the probe at epoch 0's end.
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            os.killpg(os.getpgid(0), signal.SIGINT)


callback = StiffnessCallback(samples_per_class=2, num_bootstrap=0, kinds=["cosine"])
fit = trainer(Path(sys.argv[1]), [callback, CtrlC()], max_epochs=3)
fit.fit(TinyNet(), datamodule=DigitsData())
"""


def test_ctrl_c_at_a_terminal_still_delivers_every_probes_images(tmp_path):
    """Ctrl+C signals the terminal's whole foreground process group, the render worker included."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ, LIGHTNING_STIFFNESS_STRICT="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # Lightning's graceful shutdown
    assert "Detected KeyboardInterrupt" in done.stdout + done.stderr
    (log_dir,) = tmp_path.glob("lightning_logs/version_*")
    assert sorted(raw_results(log_dir)) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt"]
    lost = [line for line in done.stderr.splitlines() if "render worker exited" in line]
    assert not lost, lost
    assert _image_steps(log_dir) == [0, 4]


# ------------------------------------------------------------------------------------------ loggers and callbacks


def test_two_prefixes_in_wandb_mlflow_csv_and_tensorboard_at_once(tmp_path, system_temp, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    before = _workers()
    wandb_logger = WandbLogger(project="review", save_dir=str(tmp_path), offline=True)
    mlflow_logger = MLFlowLogger(experiment_name="review", tracking_uri=(tmp_path / "mlruns").as_uri())
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    loggers = [tb, wandb_logger, mlflow_logger, CSVLogger(tmp_path, name="csv", version=0)]
    callbacks = [_callback(), _callback(kinds=["sign"], prefix="sign2", every_n_steps=3)]
    fit = trainer(tmp_path, callbacks, max_epochs=2, logger=loggers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    wandb_logger.experiment.finish()
    assert not _stiffness_warnings(caught)
    steps = {"stiffness": [0, 4, 8], "sign2": [0, 3, 6]}
    per_probe = 6  # three pairs: a class matrix and a distance curve each
    for prefix, probed in steps.items():
        kind = "cosine" if prefix == "stiffness" else "sign"
        assert _image_steps(tb.log_dir, class_matrix_tag("train-val", kind, prefix)) == probed
        assert _image_steps(tb.log_dir, distance_curve_tag("val-val", prefix=prefix)) == probed
        (run,) = (tmp_path / "wandb").glob("offline-run-*")
        media = list((run / "files" / "media" / "images" / prefix).rglob("*.png"))
        assert len(media) == per_probe * len(probed), prefix
        artifacts = tmp_path / "mlruns" / mlflow_logger.experiment_id / mlflow_logger.run_id / "artifacts" / "images"
        pictures = [p for p in artifacts.glob(f"{prefix}~*.png") if "compressed" not in p.name]
        assert len(pictures) == per_probe * len(probed), prefix
        for step in probed:  # the CSV logger's PNG files, beside the raw results (in trainer.log_dir)
            epoch = step // 5
            png = Path(fit.log_dir) / class_matrix_tag("val-val", kind, prefix) / f"epoch={epoch}-step={step}.png"
            with Image.open(png) as picture:
                assert picture.mode == "RGB"
    assert not _workers_left(before)
    assert not list(system_temp.glob("stiffness-images-*"))


class _FileWriterWithoutImages:
    """A TensorBoard file writer whose image summaries fail (a full disk, a broken store): scalars go through."""

    def __init__(self, writer):
        self._writer = writer

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def add_summary(self, summary, *args, **kwargs):
        if any(value.HasField("image") for value in summary.value):
            raise RuntimeError("image store down")
        return self._writer.add_summary(summary, *args, **kwargs)


class _Experiment:
    def __init__(self, writer):
        self._writer = writer

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def _get_file_writer(self):
        return _FileWriterWithoutImages(self._writer._get_file_writer())


class _ImagesBrokenLogger(TensorBoardLogger):
    @property
    def experiment(self):
        return _Experiment(super().experiment)


def test_a_logger_that_raises_costs_the_other_loggers_nothing(tmp_path):
    broken = _ImagesBrokenLogger(tmp_path, name="broken", version=0)
    good = TensorBoardLogger(tmp_path, name="good", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    fit = trainer(tmp_path, [_callback()], max_epochs=1, logger=[broken, good, csv])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert fit.current_epoch == 1  # training went on
    assert any("image store down" in message for message in _stiffness_warnings(caught))  # a warning instead
    assert _image_steps(good.log_dir) == [0, 4]  # the next TensorBoard logger still gets every probe's images
    assert sorted(p.name for p in (Path(fit.log_dir) / TAG).glob("*.png")) == [  # and the CSV logger its files
        "epoch=0-step=0.png",
        "epoch=0-step=4.png",
    ]


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


def test_ddp_spawn_rank_zero_writes_each_image_once(tmp_path, system_temp):
    before = _workers()
    csv = CSVLogger(tmp_path, name="csv", version=0)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = _callback(images_every_n_probes=2)
    fit = trainer(
        tmp_path, [callback], max_epochs=2, logger=[csv, tb], strategy="ddp_spawn", accelerator="cpu", devices=2
    )
    fit.fit(TinyNet(), datamodule=DigitsData())
    run_dir = tmp_path / "csv" / "version_0"
    assert sorted(raw_results(run_dir)) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt"]
    assert _image_steps(tb.log_dir) == [0, 8]  # once each: rank 0 alone writes
    pngs = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.png"))
    assert len(pngs) == 2 * 6 and all(p.endswith(("epoch=0-step=0.png", "epoch=1-step=8.png")) for p in pngs)
    assert not list((tmp_path / "tb").rglob("*.png"))
    assert not _workers_left(before)


# ------------------------------------------------------------------------------------------- the render worker


class _KillWorker(Callback):
    """Kills the render worker just after the probe at epoch 0's end was sent to it (put it after the callback)."""

    def __init__(self):
        self.killed: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            for pid in _workers():
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)


def test_killed_worker_warns_and_training_goes_on_with_images(tmp_path):
    before = _workers()
    kill = _KillWorker()
    fit = trainer(tmp_path, [_callback(), kill], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert len(kill.killed) == 1 and fit.current_epoch == 3
    assert any("render worker exited" in message for message in _stiffness_warnings(caught))
    expected = ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt", "epoch=2-step=12.pt"]
    assert sorted(raw_results(fit.log_dir)) == expected
    assert {8, 12} <= set(_image_steps(fit.log_dir))  # a new worker draws the later probes
    assert not _workers_left(before)


@pytest.mark.parametrize("skip", [{"max_epochs": 0}, {"limit_train_batches": 0}])
def test_no_worker_left_when_fit_does_not_train(tmp_path, skip):
    """A fit that trains nothing (max_epochs=0, no batches, a resumed run already at its end) still sets up."""
    before = _workers()
    fit = trainer(tmp_path, [_callback()], **skip)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert not _workers_left(before, patience_s=10.0)


# --------------------------------------------------------------------------------------------------- schedules


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


# ----------------------------------------------------------------------------------------------------- figures


class _ThirtyClasses(LightningDataModule):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(30).repeat(6)
        x = torch.randn(len(y), 8, generator=generator) + nn.functional.one_hot(y % 8, 8).float()
        self.train_set, self.val_set = TensorDataset(x[:120], y[:120]), TensorDataset(x[120:], y[120:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=30, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=30)


class _ThirtyWay(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 30))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_thirty_classes_with_long_names_as_png_files(tmp_path):
    names = [f"a rather long class name number {c}" for c in range(30)]
    callback = _callback(class_names=names)
    fit = trainer(tmp_path, [callback], max_epochs=1, logger=CSVLogger(tmp_path), limit_train_batches=2)
    fit.fit(_ThirtyWay(), datamodule=_ThirtyClasses())
    for pair in ("train-train", "train-val", "val-val"):
        files = sorted((Path(fit.log_dir) / class_matrix_tag(pair, "cosine")).glob("*.png"))
        assert [p.name for p in files] == ["epoch=0-step=0.png", "epoch=0-step=2.png"]
        with Image.open(files[-1]) as picture:
            assert picture.mode == "RGB" and max(picture.size) <= 2000
    spec_names = callback._probes.class_names
    assert list(spec_names) == names


def _texts_outside(figure) -> list[tuple[str, list[int]]]:
    """The title, axis labels and figure texts that reach beyond the figure's edges (as matplotlib lays them out,
    which the fast drawing copies)."""
    figure.canvas.draw()
    renderer, frame = figure.canvas.get_renderer(), figure.bbox
    texts = [*figure.texts]
    for axes in figure.axes[:1]:
        texts += [axes.title, axes.xaxis.label, axes.yaxis.label]
    outside = []
    for text in texts:
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > frame.x1 + 0.5 or box.y1 > frame.y1 + 0.5:
            outside.append((text.get_text(), [round(v) for v in box.extents]))
    return outside


def test_two_class_matrix_title_fits_a_long_run(tmp_path):
    title = "sign stiffness, train-val (epoch 12, step 4567): within -0.12, between -0.01"  # as _matrix_spec writes it
    spec = MatrixSpec(
        np.zeros((2, 2)),
        ("0", "1"),  # the labels, as named when the dataset has no `classes`
        title,
        "class of the train example (rows: train set)",
        "class of the val example (columns: val set)",
    )
    assert _texts_outside(Painter().figure(spec)) == []


def test_layer_distance_curve_title_fits(tmp_path):
    layer = "encoder.layer.11.output"
    edges = np.linspace(0.1, 0.9, 5)
    mean, count = np.array([0.5, 0.3, 0.2, 0.1]), np.array([10, 10, 10, 10])
    spec = CurveSpec(
        edges,
        mean,
        count,
        mean - 0.3,
        count,
        Line(0.7, -1.0, 0.7, 0.1, 0.9),
        None,
        f"cosine stiffness against distance in {layer}, train-val (epoch 9, step 4500)",  # as _curve_spec writes it
        f"cosine distance between outputs of {layer}",
        "mean cosine stiffness",
    )
    assert _texts_outside(Painter().figure(spec)) == []
    assert math.isfinite(spec.fit.xi)


def test_pngs_decode_and_images_are_the_drawn_ones(tmp_path):
    fit = trainer(tmp_path, [_callback()], max_epochs=1, logger=CSVLogger(tmp_path))
    fit.fit(TinyNet(), datamodule=DigitsData())
    for path in (Path(fit.log_dir) / distance_curve_tag("train-val")).glob("*.png"):
        with Image.open(io.BytesIO(path.read_bytes())) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 400
