"""How the stages submit their tasks: a :class:`Lane` per tomogram (priority, worker resources, abort).

Each tomogram's chain computes through its own lane. On a ``distributed`` client the tasks are submitted with
the lane's priority (earlier tomograms first, so a tomogram's post-processing runs before the next ones'
network and outputs appear tomogram by tomogram) and, when the cluster advertises them, worker resources
(network tasks on ``GPU`` workers, the rest on ``CPU`` workers: :mod:`cryosiam_dask.run.cluster`). The wait
polls an abort event, so a run-wide failure (the memory watchdog, a lost scheduler) ends every chain.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import dask

PROGRESS = {"on": False}
"""Set ``PROGRESS["on"] = True`` for a progress bar on stderr (single-tomogram runs only)."""



@dataclass(frozen=True)
class Resources:
    """Worker resources per kind of task (None: any worker)."""

    network: dict[str, float] | None = None
    host: dict[str, float] | None = None


@dataclass
class Abort:
    """A run-wide stop: :meth:`stop` with the error every waiting chain raises."""

    event: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def stop(self, error: BaseException) -> None:
        """Stop every chain of the run with `error` (the first error wins)."""
        if self.error is None:
            self.error = error
        self.event.set()


@dataclass(frozen=True)
class Lane:
    """Where one tomogram's tasks go: ``priority`` (higher first), ``resources``, a shared :class:`Abort`."""

    priority: int = 0
    resources: Resources = field(default_factory=Resources)
    abort: Abort = field(default_factory=Abort)
    progress: bool = False

    def compute(self, *objs: Any, network: bool = False) -> tuple[Any, ...]:
        """``dask.compute(*objs)`` on this lane; ``network=True`` for the network's tasks."""
        if not objs:
            return ()
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            return self._local(objs)
        resources = self.resources.network if network else self.resources.host
        futures = client.compute(list(objs), priority=self.priority, resources=resources)
        if self.progress and PROGRESS["on"]:
            from distributed import progress

            progress(futures)
            print(file=sys.stderr)
        return tuple(self._wait(client, futures))

    def _local(self, objs: tuple[Any, ...]) -> tuple[Any, ...]:
        if not (self.progress and PROGRESS["on"]):
            return dask.compute(*objs)
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return dask.compute(*objs)

    def _wait(self, client: Any, futures: list[Any]) -> list[Any]:
        """The futures' results in order; each future is released as soon as its result is here, so the
        workers forget the task (and the arguments it holds) instead of keeping every task of a stage."""
        import time

        from distributed import as_completed

        results: list[Any] = [None] * len(futures)
        slots: dict[Any, list[int]] = {}
        for i, f in enumerate(futures):
            slots.setdefault(f.key, []).append(i)
        pending = {f.key: f for f in futures}
        futures = []  # only `pending` holds them now: released ones can go
        done = as_completed(list(pending.values()))
        while pending:
            if self.abort.event.is_set():
                client.cancel(list(pending.values()))
                raise self.abort.error  # type: ignore[misc]
            batch = done.next_batch(block=False)
            if not batch:
                time.sleep(0.05)
                continue
            for f in batch:
                if f.status == "error":  # the first failure's own exception, not a cancelled sibling's
                    client.cancel([g for g in pending.values() if not g.done()])
                    f.result()
                value = f.result()
                for i in slots[f.key]:
                    results[i] = value
                pending.pop(f.key, None)
                f.release()
        return results


DEFAULT_LANE = Lane()
"""No priority, any worker: for stage functions called outside a dataset run (tests, notebooks)."""
