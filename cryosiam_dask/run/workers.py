"""The workers of a cluster started or attached to: their start-up checks and their log file.

Imported by the worker processes (:class:`WorkerStderrToFile`, :func:`import_modules`), so it imports neither
torch nor the package's heavy modules at top level (distributed only).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from cryosiam_dask.errors import ClusterError, CryoSiamDaskError
from cryosiam_dask.run.failures import exception_line, see_log, stage_error

__all__ = ["TASK_MODULES", "WORKER_WAIT_S", "WorkerStderrToFile", "check_workers", "import_modules"]

WORKER_WAIT_S = 120.0
"""Longest wait for the workers to start, join and import the task modules (torch is not imported here)."""

TASK_MODULES = (
    "cryosiam_dask.run.maps",
    "cryosiam_dask.run.segment",
    "cryosiam_dask.run.multicut",
    "cryosiam_dask.run.write",
)
"""Modules whose functions become tasks: each worker must import them (and what they import) before work (a
worker that fails to import a task's module while the scheduler sends it the task hangs the run, in
distributed 2026.8)."""


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
            return f"cannot import {name} ({exception_line(e)})"
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
        raise ClusterError(f"{what} did not answer within {timeout:.0f} s; {see_log()}")
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
            f"{timeout:.0f} s; {see_log()}"
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
                f"({exception_line(answer)}); {see_log()}"
            )
        if answer:
            raise ClusterError(
                f"a dask worker ({address}) of {where} {answer}; install the same environment "
                f"on the workers as on the client; {see_log()}"
            )
