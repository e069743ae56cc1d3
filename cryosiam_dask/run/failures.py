"""Failures of the cluster and of its tasks, as one-line user errors, in bounded time.

Every way a run on dask can fail ends here:

- a worker killed by the OS or by its nanny's memory limit while running a task: distributed retries the task
  on a fresh worker :data:`ALLOWED_FAILURES` time(s), then raises ``KilledWorker`` (:func:`stage_error` names
  the task, the cause seen by the nanny and the memory limit);
- a worker that cannot start, or cannot import the modules of our tasks: found before any task by
  :func:`check_workers` (a worker that fails to import a task's module while the scheduler sends it the task
  hangs the run, in distributed 2026.8), with a bounded wait;
- a task that raises: its exception type and message, on one line (the traceback goes to the log file);
- the scheduler gone (connection lost, futures cancelled): one line.

The module is imported by the workers (:class:`WorkerStderrToFile`, :func:`import_modules`), so it imports
neither torch nor the package's heavy modules at top level (distributed only).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from cryosiam_dask.errors import ClusterError, CryoSiamDaskError, ParameterError, TaskError

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FAILURES",
    "TASK_MODULES",
    "WORKER_WAIT_S",
    "ClusterError",
    "FailureContext",
    "TaskError",
    "WorkerStderrToFile",
    "check_workers",
    "import_modules",
    "is_run_failure",
    "one_line",
    "quiet_distributed_tracebacks",
    "stage_error",
    "watching",
]

ALLOWED_FAILURES = 1
"""``distributed.scheduler.allowed-failures`` of the clusters started here (distributed's default is 3): a
task whose worker dies is retried once on a fresh worker (a one-off loss recovers), a task that kills every
worker fails after two deaths instead of four."""

WORKER_WAIT_S = 120.0
"""Longest wait for the workers to start, join and import the task modules (torch is not imported here)."""

TASK_MODULES = (
    "cryosiam_dask.run.maps",
    "cryosiam_dask.run.segment",
    "cryosiam_dask.run.multicut",
    "cryosiam_dask.run.write",
)
"""Modules whose functions become tasks: each worker must import them (and what they import) before work."""


def one_line(text: str, limit: int = 400) -> str:
    """``text`` with its lines joined by spaces and cut at ``limit`` characters."""
    joined = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def _exception_line(e: BaseException) -> str:
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


def _see_log() -> str:
    path = _context().worker_log
    return f"see the worker log {path}" if path is not None else "see the dask workers' log"


# ----------------------------------------------------------------------------------- in the worker processes
class WorkerStderrToFile(WorkerPlugin):
    """Worker plugin: the worker process's stderr (its log records, warnings, tracebacks) goes to ``path``.

    Keeps a failed task's ``Compute Failed ... Traceback`` records off the terminal, where the run prints its
    one-line error; the one-line error names the file.

    Parameters
    ----------
    path : Path
        Worker log file, appended to by every worker process of the run.
    """

    name = "cryosiam_dask-worker-log"

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def setup(self, worker: Any) -> None:
        """Redirect file descriptor 2 (so C-level messages follow too) to the worker log."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            sys.stderr.flush()
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        print(f"--- worker {getattr(worker, 'address', '?')} pid {os.getpid()}", file=sys.stderr, flush=True)



def import_modules(modules: tuple[str, ...]) -> str | None:
    """Import ``modules`` in this process; None, or the first failure on one line (run on each worker)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as e:  # an import may raise anything (SystemExit from a C extension included)
            return f"cannot import {name} ({_exception_line(e)})"
    return None


def _with_timeout(fn: Any, timeout: float, what: str) -> Any:
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=target, daemon=True, name="cryosiam_dask-check-workers")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ClusterError(f"{what} did not answer within {timeout:.0f} s; {_see_log()}")
    if error:
        raise error[0]
    return result[0]


def check_workers(
    client: Any,
    *,
    n_workers: int = 1,
    modules: tuple[str, ...] = TASK_MODULES,
    timeout: float = WORKER_WAIT_S,
    where: str = "the local cluster",
) -> None:
    """Wait (bounded) for ``n_workers`` workers, then make each import ``modules``; a failure is one line.

    Raises
    ------
    ClusterError
        Too few workers within ``timeout``, a worker that cannot import a module, or one that died doing so.
    """
    from distributed.exceptions import WorkerStartTimeoutError

    try:
        client.wait_for_workers(n_workers, timeout=timeout)
    except WorkerStartTimeoutError as e:
        raise ClusterError(
            f"only {e.available_workers} of {n_workers} dask worker(s) of {where} started within "
            f"{timeout:.0f} s; {_see_log()}"
        ) from None
    except CryoSiamDaskError:
        raise
    except Exception as e:
        raise stage_error(e, "start") from e
    try:
        answers = _with_timeout(
            lambda: client.run(import_modules, modules, on_error="return"), timeout, "the dask workers"
        )
    except CryoSiamDaskError:
        raise
    except Exception as e:
        raise stage_error(e, "start") from e
    for address, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            raise ClusterError(
                f"a dask worker ({address}) of {where} failed while importing the task modules "
                f"({_exception_line(answer)}); {_see_log()}"
            )
        if answer:
            raise ClusterError(
                f"a dask worker ({address}) of {where} {answer}; install the same environment "
                f"on the workers as on the client; {_see_log()}"
            )


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
        f"{_see_log()}"
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
            f"scheduler is running, then run again (finished chunks are kept); {_see_log()}"
        )
    if isinstance(e, OSError):
        from cryosiam_dask.run.write import output_error

        return output_error(e, Path(e.filename) if getattr(e, "filename", None) else (work_dir or Path(".")))
    if isinstance(e, Exception):
        return TaskError(
            f"stage {stage} failed: {_exception_line(e)} (raised in a dask task or while waiting for one; "
            f"{_see_log()} and the run's log for the traceback, or run with --debug)"
        )
    return e


# --------------------------------------------------------------------------------------------- logging
class _OneLineRecords(logging.Filter):
    """One line of at most 300 characters per record on a stderr handler (a traceback: its last line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text} ({_exception_line(record.exc_info[1])})"
        record.msg, record.args = one_line(text, 300), None  # e.g. the list of every lost task's key
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


@contextmanager
def quiet_distributed_tracebacks() -> Iterator[None]:
    """While the CLI runs: distributed's log records in this process print one line each, no traceback."""
    import distributed  # noqa: F401  # its import installs the handlers filtered here

    logger_ = logging.getLogger("distributed")
    filt = _OneLineRecords()
    handlers = [h for h in logger_.handlers if isinstance(h, logging.StreamHandler)]
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)
