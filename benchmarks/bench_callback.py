"""Callback overhead: one probe's computation against one training epoch, measured side by side in one process.

The setting of the target in the issue tracker: the paper's fully connected net (784-500-300-100-10), a probe of
500 training and 500 validation examples (50 per class), both kinds, every measure; against one epoch over 60,000
examples of 784 features at batch size 32 (Lightning Trainer, Adam). Rendering the probe's nine images is timed
separately (in this process, as a worker draws them).

Then whole runs side by side, as a user would try it: the paper's FC net on bundled digits (examples/digits.py), 6
epochs, a probe at initialisation and after every epoch, 20 examples a class, with the nine default images at every
probe (drawn in the callback's worker process) against the same run with ``log_images=False``. It prints the ratio
of wall times (target: at most 1.5) and the time the training thread spends on images per probe (target: under
50 ms): sending figures to the worker, handing finished images to TensorBoard, and waiting at the end of training.

    python benchmarks/bench_callback.py                  # both parts
    python benchmarks/bench_callback.py --runs           # only the whole runs
    python benchmarks/bench_callback.py --runs --threads 1   # the training process's torch on one thread
"""

import importlib.util
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gram import paper_fc

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import gradient_gram
from lightning_stiffness.images.image_writer import ImageWriter
from lightning_stiffness.images.specs import probe_images
from lightning_stiffness.measures.probe_measures import measure_stiffness


class PaperFC(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = paper_fc()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def probe_once(model: nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], method: str):
    model.eval()
    x = torch.cat([s[0] for s in sets.values()])
    y = torch.cat([s[1] for s in sets.values()])
    gram = gradient_gram(model, x, y, method=method)
    result = measure_stiffness(
        gram,
        {k: v[0] for k, v in sets.items()},
        {k: v[1] for k, v in sets.items()},
        {k: torch.arange(len(v[1])) for k, v in sets.items()},
        num_classes=10,
    )
    model.train()
    return result


def render(result) -> int:
    return len(probe_images(result, [str(c) for c in range(10)]))


class _TrainingThreadClock:
    """Seconds the training thread spends in the image writer's methods (sending, handing out, the final wait)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.final_wait = 0.0
        self._originals = {name: getattr(ImageWriter, name) for name in ("write", "deliver", "finish")}

    def __enter__(self) -> "_TrainingThreadClock":
        for name, original in self._originals.items():
            setattr(ImageWriter, name, self._timed(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(ImageWriter, name, original)

    def _timed(self, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                if original.__name__ == "finish":
                    self.final_wait = time.perf_counter() - start

        return timed


def _digits_run(root: Path, log_images: bool, epochs: int = 6) -> tuple[float, float, int, float]:
    """Wall seconds of one fit, seconds the training thread spent on images, the probes made, and the seconds of
    the final wait for the worker (part of the second number)."""
    spec = importlib.util.spec_from_file_location(
        "digits_example", Path(__file__).resolve().parents[1] / "examples" / "digits.py"
    )
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    from lightning.pytorch import seed_everything

    seed_everything(0)
    data = digits.DigitsDataModule(batch_size=32)
    model = digits.PaperNet(arch="fc", hidden=[500, 300, 100])
    callback = StiffnessCallback(samples_per_class=20, log_images=log_images)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with _TrainingThreadClock() as clock:
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
    return seconds, clock.seconds, callback._probes_done, clock.final_wait


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the render workers, once reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def runs(pairs: int = 3) -> None:
    """``pairs`` runs without and with images, alternating (a shared machine's load drifts); medians compared."""
    plain, drawn, on_images, final_waits, worker_cpu = [], [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        _digits_run(Path(root) / "warm-up", log_images=True, epochs=1)
        for index in range(pairs):
            before = _children_cpu()
            seconds, thread, probes, final_wait = _digits_run(Path(root) / f"images-{index}", log_images=True)
            plain.append(_digits_run(Path(root) / f"plain-{index}", log_images=False)[0])  # meanwhile, it is reaped
            worker_cpu.append(_children_cpu() - before)
            drawn.append(seconds)
            on_images.append(thread / probes)
            final_waits.append(final_wait)
    plain_s, drawn_s = statistics.median(plain), statistics.median(drawn)
    thread_ms, wait_ms = 1000 * statistics.median(on_images), 1000 * statistics.median(final_waits)
    print(f"digits, FC net, 6 epochs, {probes} probes, 20 examples a class; torch {torch.get_num_threads()} threads")
    print(
        f"runs without images: {' '.join(f'{s:.2f}' for s in plain)} s; with: {' '.join(f'{s:.2f}' for s in drawn)} s"
    )
    print(f"run without images (median of {pairs}):          {plain_s:8.2f} s")
    print(f"run with the 9 default images at every probe:  {drawn_s:8.2f} s")
    print(f"with images / without:                         {drawn_s / plain_s:8.2f} x   (target: at most 1.5)")
    print(f"training thread on images, per probe:          {thread_ms:8.1f} ms (target: under 50)")
    print(f"  of which waiting once at the end:            {wait_ms / probes:8.1f} ms ({wait_ms:.0f} ms in all)")
    print(f"render worker's CPU time in a run:             {statistics.median(worker_cpu):8.2f} s")


def main() -> None:
    if "--threads" in sys.argv:  # torch's intra-op threads in the training process (default: one per core)
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    if "--runs" in sys.argv:
        runs()
        return
    torch.manual_seed(0)
    model = PaperFC()
    train = TensorDataset(torch.randn(60_000, 784), torch.randint(0, 10, (60_000,)))
    sets = {
        "train": (torch.randn(500, 784), torch.arange(10).repeat_interleave(50)),
        "val": (torch.randn(500, 784), torch.arange(10).repeat_interleave(50)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    probe_once(model, {k: (v[0][:8], v[1][:8]) for k, v in sets.items()}, "auto")  # warm-up

    start = time.perf_counter()
    result = probe_once(model, sets, "auto")
    probe_seconds = time.perf_counter() - start

    start = time.perf_counter()
    images = render(result)
    render_seconds = time.perf_counter() - start

    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    epoch_seconds = time.perf_counter() - start

    start = time.perf_counter()
    probe_once(model, {k: (v[0][:200], v[1][:200]) for k, v in sets.items()}, "torch.func")
    torchfunc_seconds = time.perf_counter() - start

    print(f"one probe, factored (1000 examples, all blocks and measures): {probe_seconds:8.3f} s")
    print(f"one probe, torch.func engine on 400 examples only (reference): {torchfunc_seconds:8.3f} s")
    print(f"rendering the probe's {images} images:                           {render_seconds:8.3f} s")
    print(f"one training epoch (60,000 examples, batch 32):               {epoch_seconds:8.3f} s")
    print(f"probe / epoch:               {probe_seconds / epoch_seconds:8.2%}   (target: at most 10%)")
    print(f"probe + images / epoch:      {(probe_seconds + render_seconds) / epoch_seconds:8.2%}   (images drawn here)")
    runs()


if __name__ == "__main__":
    main()
