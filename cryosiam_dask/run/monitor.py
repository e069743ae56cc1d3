"""Watchers beside a run: the work dir's peak size, and workers stuck paused for lack of memory.

distributed pauses a worker at 80 % of its ``memory_limit`` (it stops starting tasks until memory is freed).
When every worker stays paused, nothing can free memory and the run would wait forever; the watchdog stops
it with one line naming memory instead (``cryosiam_dask.paused_timeout``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryosiam_dask.errors import ClusterError

__all__ = ["DiskPeak", "PausedWatchdog", "Sampler", "tree_bytes"]


def tree_bytes(folder: Path) -> int:
    """Bytes allocated on disk by the files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed meanwhile
                continue
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


class Sampler:
    """Calls :meth:`sample` every `interval` seconds on a daemon thread while the context is open (and once
    at each end); subclasses define :meth:`sample`."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:  # pragma: no cover - overridden
        """Take one sample now."""
        raise NotImplementedError

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class DiskPeak(Sampler):
    """The largest size of `folder` seen while open (sampled every `interval` seconds and at both ends)."""

    def __init__(self, folder: Path, interval: float = 2.0) -> None:
        super().__init__(interval)
        self.folder = Path(folder)
        self.peak = 0

    def sample(self) -> None:
        """Take one sample now."""
        self.peak = max(self.peak, tree_bytes(self.folder))


class PausedWatchdog(Sampler):
    """Calls ``stop(ClusterError)`` once every worker has been paused for `timeout` seconds.

    Parameters
    ----------
    workers : callable
        Returns distributed's worker info (``client.scheduler_info()["workers"]``: status, memory_limit).
    timeout : float
        Seconds of all workers paused before the run is stopped.
    stop : callable
        Receives the one-line error (:meth:`cryosiam_dask.run.progress.Abort.stop`).
    """

    def __init__(
        self,
        workers: Callable[[], dict[str, Any]],
        timeout: float,
        stop: Callable[[Exception], None],
        interval: float = 5.0,
    ) -> None:
        super().__init__(min(interval, timeout / 2))
        self.workers, self.timeout, self.stop = workers, timeout, stop
        self.since: float | None = None
        self.fired = False

    def sample(self) -> None:
        """Take one sample now."""
        try:
            info = self.workers()
        except Exception:  # the client is closing: nothing to watch
            return
        paused = bool(info) and all(str(w.get("status", "")).endswith("paused") for w in info.values())
        now = time.monotonic()
        if not paused:
            self.since = None
            return
        self.since = self.since if self.since is not None else now
        if now - self.since >= self.timeout and not self.fired:
            self.fired = True
            from dask.utils import format_bytes

            limits = sorted({int(w.get("memory_limit") or 0) for w in info.values()})
            limit = ", ".join(format_bytes(v) for v in limits if v) or "not set"
            self.stop(
                ClusterError(
                    f"every dask worker has been paused for {self.timeout:.0f} s: out of memory "
                    f"(distributed pauses a worker at 80 % of its memory_limit, {limit}); lower chunk_size "
                    "or tomograms_in_flight, or "
                    "raise cryosiam_dask.memory_limit, and run again (finished chunks are kept)"
                )
            )
