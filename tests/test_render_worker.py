"""The render worker process, which draws images off the training process: every probe's images delivered when
training raises, on a KeyboardInterrupt and on Ctrl+C at a terminal; with ddp_spawn, rank zero alone writes each image,
once; a killed worker is warned about and replaced; no worker is left behind, not even by a fit that trains nothing."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_stiffness.names import class_matrix_tag
from tests.helpers import DigitsData, TinyNet, _callback, _image_steps, _stiffness_warnings, raw_results, trainer

ROOT = Path(__file__).resolve().parents[1]
TAG = class_matrix_tag("train-val", "cosine")
WORKER = "lightning_stiffness.images.drawing import serve"


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


# ----------------------------------------------------------------------------------------------------- ddp_spawn


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
