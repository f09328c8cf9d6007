"""A small digits setup for callback tests: scikit-learn's bundled digits, nothing downloaded."""

import copy
import os
import select
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import PREFIX, class_matrix_tag
from tests.reference import PAIRS, cos64, input_distance64, reference_gradients

#: A raw file of format version 1, written by the code before version 2 (TinyNet on digits, 2 examples a class,
#: ``per_layer``, ``layers=["net.1"]``, class groups, 20 bootstrap draws), and the scalars that code logged for it.
FIXTURE_V1 = Path(__file__).parent / "data" / "raw_format_v1.pt"
FIXTURE_V1_SCALARS = Path(__file__).parent / "data" / "raw_format_v1_scalars.json"


def digits_tensors(n: int = 400):
    digits = load_digits()
    x = torch.tensor(digits.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:n], dtype=torch.long)
    return x, y


class DictDataset(Dataset):
    """Items as dicts, the layout of many tokenised or image datasets."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class DigitsData(LightningDataModule):
    def __init__(self, n: int = 400, batch_size: int = 32, dict_items: bool = False, float_labels: bool = False):
        super().__init__()
        x, y = digits_tensors(n)
        if float_labels:
            y = y.float()
        split = int(0.75 * n)
        make = DictDataset if dict_items else TensorDataset
        self.train_set, self.val_set = make(x[:split], y[:split]), make(x[split:], y[split:])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TinyNet(LightningModule):
    def __init__(self, dropout: float = 0.0, lr: float = 0.05, nan_after_epoch: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 10))
        self.lr = lr
        self.nan_after_epoch = nan_after_epoch

    def forward(self, x):
        out = self.net(x.flatten(1))
        if self.nan_after_epoch is not None and not self.training and self.current_epoch >= self.nan_after_epoch:
            out = out * float("nan")  # a model gone bad, seen only by the probe (which runs in eval mode)
        return out

    def _batch(self, batch):
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch

    def training_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        loss = nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._batch(batch)
        self.log("val_loss", nn.functional.cross_entropy(self.net(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(tmp_path: Path, callbacks, **kwargs) -> Trainer:
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=4,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def events(log_dir: Path) -> EventAccumulator:
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def raw_results(log_dir: Path, prefix: str = PREFIX) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((Path(log_dir) / prefix).glob("*.pt"))}


# Shared by the image tests (test_images, test_loggers, test_render_worker, test_schedule).
CLASS_MATRIX_TAG = class_matrix_tag("train-val", "cosine")


def _callback(**kwargs) -> StiffnessCallback:
    options = dict(samples_per_class=2, num_bootstrap=0, kinds=["cosine"])
    options.update(kwargs)
    return StiffnessCallback(**options)


def _image_steps(log_dir, tag=CLASS_MATRIX_TAG) -> list[int]:
    accumulator = events(log_dir)
    if tag not in accumulator.Tags()["images"]:
        return []
    return [event.step for event in accumulator.Images(tag)]


def _stiffness_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "Stiffness" in str(w.message)]


# Shared by the probe tests against float64 references (test_intervals, test_coherence, test_groups, test_dataset).

GROUPS = {"round": [0, 6, 8, 9], "straight": [1, 4, 7], "curly": [2, 3, 5]}


class Data(LightningDataModule):
    def __init__(self, train, val=None, batch_size=16, shuffle=True):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.shuffle = batch_size, shuffle

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=self.batch_size)


class Net(LightningModule):
    """Digits MLP; ``kind="bn"`` adds BatchNorm1d, ``"gru"`` reads the 8x8 image as 8 steps of 8 pixels;
    ``dead_pixel``: examples whose pixel 36 is below 0.3 get constant outputs (zero gradient, NaN stiffness)."""

    def __init__(self, kind="mlp", dead_pixel=False, dropout=0.0, lr=0.1):
        super().__init__()
        self.kind, self.dead_pixel, self.lr = kind, dead_pixel, lr
        if kind == "gru":
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 10)
        else:
            hidden = [nn.Linear(64, 12)] + ([nn.BatchNorm1d(12)] if kind == "bn" else [])
            self.net = nn.Sequential(*hidden, nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 10))

    def forward(self, x):
        if self.kind == "gru":
            out = self.head(self.gru(x.reshape(-1, 8, 8))[0][:, -1])
        else:
            out = self.net(x.flatten(1))
        if self.dead_pixel:
            out = out * (x.flatten(1)[:, 36:37] >= 0.3).to(out.dtype)
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Snapshots(Callback):
    """The module's state at the start of training and at each epoch's end (put it before the stiffness callback)."""

    def __init__(self):
        self.states = {}

    def on_train_start(self, trainer, pl_module):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def digits_sets(per_class_train=None, per_class_val=None, n=600):
    x, y = digits_tensors(n)
    xt, yt, xv, yv = x[:400], y[:400], x[400:], y[400:]

    def cut(xs, ys, counts):
        if counts is None:
            return xs, ys
        keep = torch.cat([torch.nonzero(ys == c).flatten()[: counts.get(c, 10**6)] for c in range(10)])
        keep = keep.sort().values
        return xs[keep], ys[keep]

    xt, yt = cut(xt, yt, per_class_train)
    xv, yv = cut(xv, yv, per_class_val)
    return TensorDataset(xt, yt), TensorDataset(xv, yv)


def fit(tmp_path, model, data, stiffness, **kwargs):
    snaps = Snapshots()
    options = dict(max_epochs=1, limit_train_batches=2)
    options.update(kwargs)
    t = trainer(tmp_path, [snaps, stiffness], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=data)
    return t, snaps


def probe_results(t):
    return {
        name: StiffnessResult.from_dict(d)
        for name, d in raw_results(t.log_dir).items()
        if not name.startswith("dataset")
    }


def probe_reference(model_cls_kwargs, state, result, data, layer=None):
    """Float64 per-example gradients of the probe examples (model rebuilt from ``state``), their cosines, input
    distances (and a layer's cosine distances) per pair."""
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = Net(**model_cls_kwargs).to(dtype)
    model.load_state_dict(state)
    sets = {"train": data.train_set, "val": data.val_set}
    xs, g = {}, {}
    for name, idx in result.indices.items():
        x, y = sets[name].tensors[0][idx], sets[name].tensors[1][idx]
        assert torch.equal(y, result.labels[name])
        xs[name] = x
        g[name] = reference_gradients(model, x, y, float64_copy=True)
    cos, dist, ldist = {}, {}, {}
    m64 = copy.deepcopy(model).double().eval()
    for pair, (r, c) in PAIRS.items():
        if r in g and c in g:
            cos[pair] = cos64(g[r], g[c])
            dist[pair] = input_distance64(xs[r], xs[c])
            if layer is not None:
                module = dict(m64.named_modules())[layer]
                outs = {}
                for name in (r, c):
                    captured = []
                    handle = module.register_forward_hook(lambda mod, i, o, out=captured: out.append(o))
                    with torch.no_grad():
                        m64(xs[name].double())
                    handle.remove()
                    outs[name] = captured[0]
                ldist[pair] = input_distance64(outs[r], outs[c])
    return g, cos, dist, ldist


# Shared by the render worker's tests (test_render_worker, test_loggers): the worker processes a fit leaves.

#: The command line of a render worker (``python -c "from lightning_stiffness.images.drawing import serve; ..."``).
WORKER = "lightning_stiffness.images.drawing import serve"


def children(pid: int | None = None) -> list[tuple[int, str, str]]:
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


def workers() -> set[int]:
    """The render workers this process started that are running (an exited one, a zombie, has no command line)."""
    return {pid for pid, _, command in children() if WORKER in command}


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_for_exit(pids: set[int], deadline_s: float = 120.0) -> set[int]:
    """Wait until every process in ``pids`` has exited (a zombie not yet reaped counts), woken by each exit (a pidfd
    becomes readable then); the processes still running after ``deadline_s``, a guard against a hang only."""
    deadline = time.monotonic() + deadline_s
    waiting: dict[int, int | None] = {}  # pid -> its pidfd, None where pidfds are not supported
    for pid in pids:
        try:
            waiting[pid] = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            continue
        except (AttributeError, OSError):  # no pidfd_open: /proc is read until the process is gone
            waiting[pid] = None
    try:
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            for pid in [pid for pid, fd in waiting.items() if fd is None and _exited(pid)]:
                del waiting[pid]
            fds = [fd for fd in waiting.values() if fd is not None]
            polled = len(fds) < len(waiting)
            if not waiting:
                break
            ready, _, _ = select.select(fds, [], [], min(remaining, 0.05) if polled else remaining)
            for pid in [pid for pid, fd in waiting.items() if fd in ready]:
                os.close(waiting.pop(pid))
        return set(waiting)
    finally:
        for fd in waiting.values():
            if fd is not None:
                os.close(fd)


def workers_left(before: set[int], deadline_s: float = 120.0) -> set[int]:
    """Render workers started since ``before`` that do not exit. A closed worker exits by itself once it has read
    the end of its input (the callback does not wait for it): each one's exit is waited for, ``deadline_s`` only
    keeps a worker that never exits from hanging the test."""
    return wait_for_exit(workers() - before, deadline_s)
