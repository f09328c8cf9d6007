"""Rendering off the training process: figure specs go to a worker process, PNG bytes come back.

Drawing with matplotlib holds the GIL, so a thread in the training process would slow training as much as drawing
in place; a separate interpreter does not. The worker is started on first use with ``python -c`` (not
``multiprocessing``: a spawned child would re-import the user's ``__main__`` script) and imports only
:mod:`~lightning_stiffness.images.drawing`, NumPy and matplotlib, never torch. Two daemon threads move pickles through
its pipes; they block on I/O and so release the GIL. The training thread only pickles specs (a few kilobytes) and,
at the next hook, picks up finished images.

When the worker cannot be started, or ``background=False``, specs are drawn in this process when submitted.
"""

import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from itertools import count
from pathlib import Path
from typing import Any

from lightning_stiffness.images.drawing import ImageSpec, Painter, render_all

#: ``(context, answer)``: ``answer`` is ``{tag: png bytes}``, or the error text when rendering failed.
Finished = tuple[Any, dict[str, bytes] | str]

_WORKER_CODE = "from lightning_stiffness.images.drawing import serve; serve()"


class Renderer:
    """Renders figure specs (``{tag: spec}``) to PNG bytes in a worker process, in submission order.

    Args:
        background: use a worker process; ``False`` draws in this process at :meth:`submit`.
        warn: ``warn(message)``, called once if the worker cannot be used and drawing falls back to this process.
    """

    def __init__(self, background: bool = True, warn: Callable[[str], None] | None = None) -> None:
        self.background = background
        self._warn = warn or _ignore
        self._process: subprocess.Popen | None = None
        self._outbox: queue.Queue = queue.Queue()
        self._finished: queue.Queue = queue.Queue()
        # job -> (context, the worker it was sent to)
        self._pending: dict[int, tuple[Any, subprocess.Popen | None]] = {}
        self._lock = threading.Lock()
        self._jobs = count()
        self._painter: Painter | None = None
        self._receiver: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Only the settings: a copy (``ddp_spawn`` pickles the callbacks into each process) starts its own worker."""
        return {"background": self.background, "warn": self._warn}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Renderer.__init__(self, state["background"], state["warn"])

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        with self._lock:
            return len(self._pending)

    def start(self) -> None:
        """Start the worker now (it takes about half a second to import matplotlib), so that it is ready when the
        first images come; without this, it starts at the first :meth:`submit`."""
        if self.background:
            self._ensure_worker()

    def submit(self, specs: Mapping[str, ImageSpec], context: Any) -> None:
        """Queue ``specs`` for rendering; ``context`` comes back with the images from :meth:`finished`."""
        if self.background and self._ensure_worker():
            job = next(self._jobs)
            with self._lock:
                self._pending[job] = (context, self._process)
            self._outbox.put(pickle.dumps((job, specs), protocol=pickle.HIGHEST_PROTOCOL))
            return
        self._painter = self._painter or Painter()
        try:
            answer: dict[str, bytes] | str = render_all(self._painter, specs)
        except Exception as err:  # reported with the probe it belongs to, as a worker's failure would be
            answer = f"{type(err).__name__}: {err}"
        self._finished.put((context, answer))

    def finished(self) -> list[Finished]:
        """Every job finished since the last call, without waiting."""
        done = []
        while True:
            try:
                done.append(self._finished.get_nowait())
            except queue.Empty:
                return done

    def wait(self, timeout: float) -> bool:
        """Wait until every submitted job has finished (or ``timeout`` seconds passed); ``True`` if all did."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.pending

    def close(self) -> None:
        """Stop the worker after the jobs already sent, without waiting for it to exit; unfinished jobs are
        dropped."""
        process, self._process = self._process, None
        if process is None:
            return
        self._outbox.put(None)
        receiver = self._receiver
        threading.Thread(target=_reap, args=(process, receiver), daemon=True, name="stiffness-reap").start()

    # --------------------------------------------------------------------------------------------------- the worker

    def _ensure_worker(self) -> bool:
        if self._process is not None and self._process.poll() is None:
            return True
        if self._process is not None:  # it died: its sender stops, its pipes close; its jobs are reported lost
            self.close()
        try:
            self._process = _start_worker()
        except OSError as err:
            self.background = False
            self._warn(f"the render worker could not start ({err}); images are drawn in the training process.")
            return False
        self._outbox = queue.Queue()
        process = self._process
        threading.Thread(target=self._send, args=(process, self._outbox), daemon=True, name="stiffness-send").start()
        self._receiver = threading.Thread(target=self._receive, args=(process,), daemon=True, name="stiffness-receive")
        self._receiver.start()
        return True

    @staticmethod
    def _send(process: subprocess.Popen, outbox: queue.Queue) -> None:
        stdin = process.stdin
        if stdin is None:  # started with pipes: never
            return
        while (frame := outbox.get()) is not None:
            try:
                stdin.write(frame)
                stdin.flush()
            except (OSError, ValueError):  # the worker is gone: the receiver reports its jobs as failed
                return
        stdin.close()

    def _receive(self, process: subprocess.Popen) -> None:
        while process.stdout is not None:
            try:
                job, answer = pickle.load(process.stdout)
            except (EOFError, OSError, pickle.UnpicklingError, ValueError):
                break
            with self._lock:
                context, _ = self._pending.pop(job, (None, None))
            if context is not None:
                self._finished.put((context, answer))
        with self._lock:  # this worker ended: what it still had will not come (a new worker's jobs stay pending)
            lost = [job for job, (_, owner) in self._pending.items() if owner is process]
            contexts = [self._pending.pop(job)[0] for job in lost]
        for context in contexts:
            self._finished.put((context, f"the render worker exited (code {process.wait()})"))


def _reap(process: subprocess.Popen, receiver: threading.Thread | None) -> None:
    """Wait for a closed worker to exit (killing it after 60 s) and close its pipes."""
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if receiver is not None:
        receiver.join(timeout=10)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def _start_worker() -> subprocess.Popen:
    """``python -c`` importing only :mod:`lightning_stiffness.images.drawing`, from where this package was imported."""
    env = dict(os.environ, MPLBACKEND="Agg")
    root = str(Path(__file__).resolve().parents[2])  # the folder holding lightning_stiffness/
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    # A session (process group) of its own: Ctrl+C at a terminal, or a signal sent to the training's process group,
    # reaches the training process, which then hands out every image still being drawn (the worker ignores SIGINT
    # too); the worker ends when the training process closes its pipe or exits.
    windows = {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}  # the flag exists on Windows only
    group = windows if os.name == "nt" else {"start_new_session": True}
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        close_fds=True,
        **group,
    )


def _ignore(message: str) -> None:
    """The default ``warn``: a module-level function, so that the renderer pickles (``ddp_spawn``)."""
