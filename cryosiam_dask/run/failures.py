"""Failures of the cluster and of its tasks, as one-line user errors, in bounded time.

Every way a run on dask can fail is mapped here (the workers' start-up checks and their log file live in
:mod:`cryosiam_dask.run.workers`):

- a worker killed by the OS or by its nanny's memory limit while running a task: distributed retries the task
  on a fresh worker :data:`ALLOWED_FAILURES` time(s), then raises ``KilledWorker`` (:func:`stage_error` names
  the task, the cause seen by the nanny and the memory limit);
- a worker that cannot start, or cannot import the modules of our tasks: found before any task by
  :func:`cryosiam_dask.run.workers.check_workers`, with a bounded wait;
- a task that raises: its exception type and message, on one line (the traceback goes to the log file);
- the scheduler gone (connection lost, futures cancelled): one line.

The workers import it (through :mod:`cryosiam_dask.run.workers`), so it imports neither torch nor the
package's heavy modules at top level (distributed only).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryosiam_dask.errors import ClusterError, CryoSiamDaskError, ParameterError, TaskError

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FAILURES",
    "FailureContext",
    "exception_line",
    "is_run_failure",
    "one_line",
    "see_log",
    "stage_error",
    "watching",
]

ALLOWED_FAILURES = 1
"""``distributed.scheduler.allowed-failures`` of the clusters started here (distributed's default is 3): a
task whose worker dies is retried once on a fresh worker (a one-off loss recovers), a task that kills every
worker fails after two deaths instead of four."""


def one_line(text: str, limit: int = 400) -> str:
    """``text`` with its lines joined by spaces and cut at ``limit`` characters."""
    joined = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def exception_line(e: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    text = one_line(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------------------- what the nanny saw
_DEATH = re.compile(
    r"Worker process (\d+) (was killed by (?:unknown )?signal(?: (\d+))?|exited with status (\d+))"
)
_MEMORY = re.compile(r"\(pid=(\d+)\) exceeded (\d+)% memory budget")


class _DeathLog(logging.Handler):
    """Keeps the nanny's last messages about dead workers (the nannies of a LocalCluster log in this process).

    distributed logs a worker's death at INFO (``Worker process 123 was killed by signal 9``) and a memory
    termination at WARNING; the handler records them, it prints nothing.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.causes: deque[str] = deque(maxlen=16)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break the nanny
            return
        if m := _MEMORY.search(text):
            self.causes.append(f"it exceeded {m.group(2)}% of its memory_limit and its nanny restarted it")
        elif m := _DEATH.search(text):
            if m.group(4) is not None:
                self.causes.append(f"its process exited with status {m.group(4)}")
            elif m.group(3) == "9":
                self.causes.append(
                    "its process was killed by signal 9 (SIGKILL: the OS out-of-memory killer "
                    "or another process)"
                )
            else:
                self.causes.append(f"its process was killed by signal {m.group(3) or '?'}")


@dataclass
class FailureContext:
    """What the messages can name about the current cluster (set by :func:`watching`)."""

    worker_log: Path | None = None
    memory_limit: str | None = None
    deaths: _DeathLog = field(default_factory=_DeathLog)


_CONTEXT: list[FailureContext] = []


def _context() -> FailureContext:
    return _CONTEXT[-1] if _CONTEXT else FailureContext()


@contextmanager
def watching(worker_log: Path | None = None, memory_limit: str | None = None) -> Iterator[FailureContext]:
    """Record the nanny's messages about dead workers while a cluster started here runs."""
    ctx = FailureContext(worker_log=worker_log, memory_limit=memory_limit)
    nanny = logging.getLogger("distributed.nanny")
    old_level = nanny.level
    if nanny.getEffectiveLevel() > logging.INFO:  # the death message is INFO; distributed's own handler stays
        nanny.setLevel(logging.INFO)  # at its level, so nothing more is printed
    nanny.addHandler(ctx.deaths)
    _CONTEXT.append(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.remove(ctx)
        nanny.removeHandler(ctx.deaths)
        nanny.setLevel(old_level)


def see_log() -> str:
    """Where the workers' log is, for the end of an error line."""
    path = _context().worker_log
    return f"see the worker log {path}" if path is not None else "see the dask workers' log"


# ------------------------------------------------------------------------------------------- the mapping
def _killed_worker(e: Any, stage: str) -> ClusterError:
    from dask.utils import format_bytes

    ctx = _context()
    tries = e.allowed_failures + 1
    limit = getattr(e.last_worker, "memory_limit", None)
    memory = (
        f"memory_limit is {format_bytes(limit)} per worker"
        if limit
        else f"memory_limit is {ctx.memory_limit or 'not set'}"
    )
    cause = ctx.deaths.causes[-1] if ctx.deaths.causes else "killed by the OS or out of memory"
    return ClusterError(
        f"a dask worker died {tries} time{'s' * (tries != 1)} while running stage {stage} "
        f"(last: {cause}; {memory}); lower chunk_size or raise memory_limit if it ran out of memory; "
        f"{see_log()}"
    )


def _is_cluster_failure(e: BaseException) -> bool:
    from concurrent.futures import CancelledError as FuturesCancelled

    from distributed.comm.core import CommClosedError
    from distributed.exceptions import WorkerStartTimeoutError

    return isinstance(e, (CommClosedError, FuturesCancelled, WorkerStartTimeoutError)) or (
        type(e).__name__ == "CancelledError"  # asyncio's, when the client's loop is torn down
    )


def is_run_failure(e: BaseException) -> bool:
    """Whether `e` stops the whole run (the scheduler or the client went away), not one tomogram."""
    return _is_cluster_failure(e)


def stage_error(e: BaseException, stage: str, work_dir: Path | None = None) -> BaseException:
    """The one-line user error for ``e`` raised while stage ``stage`` ran on the cluster (or ``e`` itself).

    Parameters
    ----------
    e : BaseException
        What the stage (or the client waiting for its tasks) raised.
    stage : str
        Stage name, for the message (``maps``, ``instances`` ...; ``start`` for the cluster's start).
    work_dir : Path, optional
        Where the stage writes, for an ``OSError`` without a file name.

    Returns
    -------
    BaseException
        A :class:`~cryosiam_dask.errors.CryoSiamDaskError` (``ClusterError``, ``TaskError``, a config-key or
        output error), or ``e`` unchanged for ``KeyboardInterrupt``/``SystemExit`` and our own errors.
    """
    if isinstance(e, CryoSiamDaskError) and not isinstance(e, ParameterError):
        return e
    if isinstance(e, ParameterError):
        from cryosiam_dask.run.settings import user_error

        return user_error(e)
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return e
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        KilledWorker = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(e, KilledWorker):
        return _killed_worker(e, stage)
    if _is_cluster_failure(e):
        reason = getattr(e, "reason", None)
        text = reason or one_line(str(e))
        detail = f"{type(e).__name__}: {text}" if text else type(e).__name__
        return ClusterError(
            f"the dask scheduler or its workers went away during stage {stage} ({detail}); check that the "
            f"scheduler is running, then run again (finished chunks are kept); {see_log()}"
        )
    if isinstance(e, OSError):
        from cryosiam_dask.run.write import output_error

        return output_error(e, Path(e.filename) if getattr(e, "filename", None) else (work_dir or Path(".")))
    if isinstance(e, Exception):
        return TaskError(
            f"stage {stage} failed: {exception_line(e)} (raised in a dask task or while waiting for one; "
            f"{see_log()} and the run's log for the traceback, or run with --debug)"
        )
    return e
