"""Callback overhead: one probe's computation against one training epoch, measured side by side in one process.

The setting of the target in the issue tracker: the paper's fully connected net (784-500-300-100-10), a probe of
500 training and 500 validation examples (50 per class), both kinds, every measure; against one epoch over 60,000
examples of 784 features at batch size 32 (Lightning Trainer, Adam). Rendering the probe's nine images is timed
separately, since the callback can render them at a lower cadence (``images_every_n_probes``) or not at all.

    python benchmarks/bench_callback.py
"""

import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gram import paper_fc

from lightning_stiffness.functional import gradient_gram
from lightning_stiffness.measure import measure_stiffness
from lightning_stiffness.plots import probe_images


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


def main() -> None:
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
    print(f"probe + images / epoch:      {(probe_seconds + render_seconds) / epoch_seconds:8.2%}")


if __name__ == "__main__":
    main()
