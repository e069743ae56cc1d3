"""Output locks: one per output stem, ``<prediction_folder>/.<stem>.cryosiam_dask.lock``, held with filelock.

The lock is an OS file lock (``fcntl.flock``): the kernel releases it when the holding process dies, so a
killed run never leaves a stale lock. Who holds it (pid, host) is written beside it, in ``<lock>.owner``, for
the message another run prints.

The stores of a stem in ``work_dir`` (which several prediction folders may share) have a second, shared lock,
``<work_dir>/<stem>/.stores.lock``: every run holds it shared (:func:`hold_work_dir`) while it runs, and the
clean-up of stale stores takes it exclusively, without waiting (:func:`try_exclusive`), so it never removes a
store another running process may be using.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from cryosiam_dask.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = ["WorkDirLock", "acquire_lock", "hold_work_dir", "lock_path", "release_lock", "try_exclusive"]

_HELD: dict[Path, FileLock] = {}


def lock_path(folder: Path, stem: str) -> Path:
    """The lock file of `stem`'s outputs in `folder`."""
    return Path(folder) / f".{stem}.cryosiam_dask.lock"


def _owner(path: Path) -> Path:
    return path.with_name(path.name + ".owner")


def acquire_lock(folder: Path, stem: str) -> Path:
    """Lock the outputs of ``stem`` in ``folder`` for this process; return the lock file.

    Raises
    ------
    OutputError
        Another run (pid, host named in the message) holds the lock, or the lock cannot be created.
    """
    path = lock_path(folder, stem)
    lock = FileLock(path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        try:
            who = _owner(path).read_text().split()
            pid, host = who[0], who[1]
        except (OSError, IndexError):
            pid, host = "?", "?"
        raise OutputError(
            f"{path}: '{stem}' is being written by another instance_predict run (pid {pid} on {host}); "
            "wait for it to finish"
        ) from None
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(f"{path}: cannot create the output lock ({what})") from e
    owner = _owner(path)
    if owner.exists():  # the last holder died without releasing: the OS freed the lock, its note stayed
        logger.warning(
            "%s: taking over the stale lock of process %s (no longer running)",
            path,
            (owner.read_text().split() or ["?"])[0],
        )
    owner.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    _HELD[path] = lock
    return path


def release_lock(path: Path) -> None:
    """Release a lock taken by :func:`acquire_lock` in this process (nothing if it is not held here)."""
    lock = _HELD.pop(Path(path), None)
    if lock is None:
        return
    _owner(path).unlink(missing_ok=True)
    lock.release()
    Path(path).unlink(missing_ok=True)


class WorkDirLock:
    """A shared ``flock`` on ``<work_dir>/<stem>/.stores.lock`` (see :func:`hold_work_dir`).

    ``fd`` is None where the OS has no ``flock`` (then no store is ever collected).
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        """Release the lock (closing the file releases it; the file stays, so its inode never changes)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hold_work_dir(work_dir: Path, stem: str) -> WorkDirLock:
    """Hold ``stem``'s work_dir lock shared for this run (waits while a clean-up holds it exclusively).

    Raises
    ------
    OutputError
        The lock file cannot be created (work_dir not writable, disk full).
    """
    path = Path(work_dir) / stem / ".stores.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: nothing is collected
        return WorkDirLock(path, None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(f"{path}: cannot create the work_dir lock ({what})") from e
    fcntl.flock(fd, fcntl.LOCK_SH)  # a clean-up holds it exclusively for a moment only
    return WorkDirLock(path, fd)


def try_exclusive(lock: WorkDirLock) -> bool:
    """Turn this run's shared lock into an exclusive one, without waiting; False if another run holds it.

    On Linux a failed conversion may drop the shared lock: call it only when the run's work is done.
    """
    if lock.fd is None:
        return False
    import fcntl

    try:
        fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
