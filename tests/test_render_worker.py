"""The render worker process, which draws images off the training process: every probe's images delivered when
training raises, on a KeyboardInterrupt and on Ctrl+C at a terminal; with ddp_spawn, rank zero alone writes each image,
once; a killed worker is warned about and replaced; no worker is left behind, not even by a fit that trains nothing."""

import os
import select
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
from tests.helpers import (
    DigitsData,
    TinyNet,
    _callback,
    _image_steps,
    _stiffness_warnings,
    raw_results,
    trainer,
    wait_for_exit,
    workers,
    workers_left,
)

ROOT = Path(__file__).resolve().parents[1]
TAG = class_matrix_tag("train-val", "cosine")

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
    before = workers()
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
    assert not workers_left(before)
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


#: The line the script prints when training has reached the step where Ctrl+C comes.
_AT_CTRL_C = b"stiffness-test: epoch 0 ended, waiting for Ctrl+C"

_CTRL_C_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from lightning_stiffness import StiffnessCallback
from tests.helpers import DigitsData, TinyNet, trainer


class CtrlC(Callback):
    # Training stops at the step where Ctrl+C comes, just after the probe at epoch 0's end: it says so, then waits
    # there for the test's SIGINT (KeyboardInterrupt, raised in the blocked read); the end of its input means the
    # test went away without sending it.
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            print({ready!r}, flush=True)
            sys.stdin.buffer.read()
            os._exit(3)


callback = StiffnessCallback(samples_per_class=2, num_bootstrap=0, kinds=["cosine"])
fit = trainer(Path(sys.argv[1]), [callback, CtrlC()], max_epochs=3)
fit.fit(TinyNet(), datamodule=DigitsData())
"""


def _read_until(process: subprocess.Popen, line: bytes, deadline_s: float = 600.0) -> bytes:
    """The output of ``process`` up to ``line`` (or to its end: it exited first); ``deadline_s`` guards against a
    hang only."""
    seen, deadline = b"", time.monotonic() + deadline_s
    fd = process.stdout.fileno()
    while line not in seen and (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        if not (chunk := os.read(fd, 65536)):
            break
        seen += chunk
    return seen


def test_ctrl_c_at_a_terminal_still_delivers_every_probes_images(tmp_path):
    """Ctrl+C signals the terminal's whole foreground process group (the render worker, in a session of its own and
    ignoring SIGINT, draws on, and the training process hands out every image); sent once training has reached the
    end of epoch 0, which waits there for it."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT.format(root=str(ROOT), ready=_AT_CTRL_C.decode()))
    env = dict(os.environ, LIGHTNING_STIFFNESS_STRICT="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    try:
        before = _read_until(process, _AT_CTRL_C)
        assert _AT_CTRL_C in before, before.decode(errors="replace")[-3000:]
        os.killpg(process.pid, signal.SIGINT)  # Ctrl+C: the foreground process group, whose leader is the script
        after, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = (before + after).decode(errors="replace")
    assert process.returncode == 1, output[-3000:]  # Lightning's graceful shutdown
    assert "Detected KeyboardInterrupt" in output
    (log_dir,) = tmp_path.glob("lightning_logs/version_*")
    assert sorted(raw_results(log_dir)) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt"]
    lost = [line for line in output.splitlines() if "render worker exited" in line]
    assert not lost, lost
    assert _image_steps(log_dir) == [0, 4]


# ----------------------------------------------------------------------------------------------------- ddp_spawn


def test_ddp_spawn_rank_zero_writes_each_image_once(tmp_path, system_temp):
    before = workers()
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
    assert not workers_left(before)


# ------------------------------------------------------------------------------------------- the render worker


class _SignalWorker(Callback):
    """Sends ``signum`` to the render worker (started since ``before``) at epoch 0's end; a SIGKILL waits for the
    worker to exit, so that the next probe finds it gone. Put a SIGSTOP before the callback, so that the worker
    cannot answer the probe at epoch 0's end before it is killed, and a SIGKILL after it."""

    def __init__(self, before: set[int], signum: int):
        self.before, self.signum = before, signum
        self.signalled: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            for pid in workers() - self.before:
                os.kill(pid, self.signum)
                self.signalled.append(pid)
            if self.signum == signal.SIGKILL:
                assert not wait_for_exit(set(self.signalled))


def test_killed_worker_warns_and_training_goes_on_with_images(tmp_path):
    before = workers()
    stop, kill = _SignalWorker(before, signal.SIGSTOP), _SignalWorker(before, signal.SIGKILL)
    fit = trainer(tmp_path, [stop, _callback(), kill], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData())
    assert len(kill.signalled) == 1 and fit.current_epoch == 3
    assert any("render worker exited" in message for message in _stiffness_warnings(caught))
    expected = ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt", "epoch=2-step=12.pt"]
    assert sorted(raw_results(fit.log_dir)) == expected
    assert {8, 12} <= set(_image_steps(fit.log_dir))  # a new worker draws the later probes
    assert not workers_left(before)


@pytest.mark.parametrize("skip", [{"max_epochs": 0}, {"limit_train_batches": 0}])
def test_no_worker_left_when_fit_does_not_train(tmp_path, skip):
    """A fit that trains nothing (max_epochs=0, no batches, a resumed run already at its end) still sets up."""
    before = workers()
    fit = trainer(tmp_path, [_callback()], **skip)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert not workers_left(before)
