"""A probe's progress bar: a transient tqdm bar on a terminal, nothing in a log file."""

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

#: ``progress(done, total)``, called as a computation advances.
Progress = Callable[[int, int], None]


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
