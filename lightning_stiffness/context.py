"""Context managers around a probe: eval mode for every submodule, random states restored, a progress bar."""

import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

Progress = Callable[[int, int], None]


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own mode (not just the top module's).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout().eval())
        >>> with eval_mode(net):
        ...     print([m.training for m in net.modules()])
        [False, False, False]
        >>> [m.training for m in net.modules()]
        [True, True, False]
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore torch's (CPU and the model's CUDA device), Python's and NumPy's random states afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[Progress | None]:
    """A transient tqdm bar updated with ``(done, total)`` blocks; ``None`` when not ``enabled`` or when stderr is
    not a terminal (a log file or CI output would collect its escape codes)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bar = tqdm(desc=description, leave=False, dynamic_ncols=True, file=sys.stderr, unit="block")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
