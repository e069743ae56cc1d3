"""Shared pieces of the output writers: atomic writes and chunk-by-chunk computation (private).

The public names live in :mod:`cryosiam_dask.outputs.cryosiam` (``atomic_output`` is re-exported there).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.backend import to_numpy
from cryosiam_dask.errors import OutputError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


# --------------------------------------------------------------------------------------- atomic writes
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _as_output_error(e: OSError, path: Path) -> OutputError | None:
    text = f"{e.strerror or e}"
    if e.errno in _DISK_FULL or "No space left" in str(e):
        return OutputError(f"disk full while writing {path}: {text}")
    if e.errno in _NOT_ALLOWED:
        return OutputError(f"cannot write {path}: {text}")
    return None


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of `path` and rename it onto `path` when the block succeeds.

    Parameters
    ----------
    path : str or PathLike
        Final file or directory (e.g. ``.ome.zarr``). Its folder is created if missing.

    Yields
    ------
    Path
        ``<folder>/.<name>.tmp-<pid>``: write the file or directory there. On success it replaces `path`
        (``os.replace``; an existing directory at `path` is removed first). On any error it is removed, so
        nothing that looks complete is left at `path`.

    Raises
    ------
    OutputError
        The folder cannot be created or is not writable, the disk is full, or writing is not permitted.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"prediction folder {folder} cannot be created: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"prediction folder {folder} is not writable")
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        was_dir = tmp.is_dir()
        _remove(tmp)
        for _ in range(10 if was_dir else 0):  # dask tasks still running may write a chunk after the error
            time.sleep(0.05)
            _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            err = _as_output_error(e, path)
            if err is not None:
                raise err from e
        raise


# ------------------------------------------------------------------------------------- chunk iteration
def _in_flight() -> int:
    """How many chunks to compute at once: the client's threads (or the CPU count), at least 2."""
    if "distributed" in sys.modules:
        from distributed import default_client

        try:
            return max(2, sum(default_client().nthreads().values()))
        except ValueError:  # no client
            pass
    return max(2, os.cpu_count() or 1)


def _check_volume(array: Any, name: str) -> da.Array:
    if not isinstance(array, da.Array):
        array = da.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be 3-D (z, y, x), got shape {array.shape}")
    return array


def _iter_blocks(arrays: Sequence[da.Array]) -> Iterator[tuple[tuple[slice, ...], list[np.ndarray]]]:
    """Compute the chunks of same-shaped `arrays` a few at a time, in the calling process.

    Yields ``(slices, [block of each array])`` in C order of the chunk grid (z outermost). The arrays are
    rechunked to the chunks of the first one; one ``dask.compute`` per batch keeps shared graphs shared.
    """
    chunks = arrays[0].chunks
    arrays = [a if a.chunks == chunks else a.rechunk(chunks) for a in arrays]
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    index = list(np.ndindex(*arrays[0].numblocks))
    step = _in_flight()
    for i in range(0, len(index), step):
        batch = index[i : i + step]
        results = dask.compute(*[[a.blocks[b] for a in arrays] for b in batch])
        for b, blocks in zip(batch, results, strict=True):
            slices = tuple(slice(int(s[j]), int(s[j + 1])) for s, j in zip(starts, b, strict=True))
            yield slices, [to_numpy(x) for x in blocks]


def _as_uint32(block: np.ndarray, path: Path) -> np.ndarray:
    if block.dtype == np.uint32:
        return block
    if block.size and (block.min() < 0 or block.max() > np.iinfo(np.uint32).max):
        raise OutputError(f"{path}: label ids outside the uint32 range [0, 4294967295]")
    return block.astype(np.uint32)

