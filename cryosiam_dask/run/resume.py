"""Resume: per-chunk done markers, fingerprints of what a store depends on, stores reused across runs.

Per-chunk markers (as daisy and volara record finished blocks): every chunk task of a stage writes its whole
zarr chunk(s) first and then a marker file ``<markers>/<z>.<y>.<x>.npz`` (atomically: temporary name, then
``os.replace``), so a marker always means the chunk's data is complete. A rerun skips the chunks that have a
marker. The stores are named by a hash of everything their values depend on (input, checkpoint, settings),
so a changed setting writes a new store instead of reusing stale chunks. Re-running a chunk (a lost worker,
a resumed run) rewrites the same bytes.

Stale stores: after a successful run, :func:`collect_stores` removes the stores of the run's stems that the
run did not use (``cryosiam_dask.work_dir_cleanup: stale``, the default), or all of them (``all``), or none
(``keep``). Only our own store names (``maps-|instances-|multicut-<16 hex>.zarr`` and their ``.done``) inside
``work_dir/<stem>`` are ever removed, and only while no other run holds that stem's work_dir lock
(:func:`cryosiam_dask.run.locks.hold_work_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def fingerprint_key(*parts: Any) -> str:
    """A 16-hex-digit hash of JSON-able ``parts`` (dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: Path | None) -> list[Any] | None:
    """``[path, size, mtime_ns]`` of a file (or None): what a stage's values depend on of an input file."""
    if path is None:
        return None
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


class ChunkMarkers:
    """Done markers of one stage's chunks, one small ``.npz`` file per chunk (picklable: a folder and a name).

    Parameters
    ----------
    folder : Path
        Marker folder (created on first save).
    stage : str
        Stage name, for the log.
    """

    def __init__(self, folder: Path, stage: str) -> None:
        self.folder = Path(folder)
        self.stage = stage

    def path(self, index: tuple[int, ...]) -> Path:
        """The marker file of chunk `index`."""
        return self.folder / (".".join(str(int(i)) for i in index) + ".npz")

    def done(self, index: tuple[int, ...]) -> bool:
        """Whether chunk `index` has its marker."""
        return self.path(index).is_file()

    def count(self) -> int:
        """Number of chunks with a marker."""
        return len(list(self.folder.glob("*.npz"))) if self.folder.is_dir() else 0

    def load(self, index: tuple[int, ...]) -> dict[str, np.ndarray] | None:
        """The arrays saved with chunk ``index``'s marker, or None if the chunk is not done."""
        path = self.path(index)
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError):  # missing or (never: written atomically) damaged
            return None

    def save(self, index: tuple[int, ...], **arrays: Any) -> None:
        """Record chunk ``index`` as done (call after its data is written), with small ``arrays``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(index)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, final)

    def clear(self) -> None:
        """Remove every marker (their data is about to be rewritten)."""
        shutil.rmtree(self.folder, ignore_errors=True)


CLEANUP_MODES = ("stale", "keep", "all")
"""``cryosiam_dask.work_dir_cleanup``: what a successful run removes from ``work_dir/<stem>``."""

STORE_NAME = re.compile(r"^(maps|instances|multicut)-[0-9a-f]{16}\.zarr(\.done)?$")
"""The names of the stores (and their marker folders) that :func:`collect_stores` may remove."""

_RECORDERS: list[set[Path]] = []
_RECORDERS_LOCK = threading.Lock()


@contextmanager
def record_stores() -> Iterator[set[Path]]:
    """Collect the stores opened by :func:`open_chunked` in this process meanwhile (from any thread).

    Two runs recording at once in one process both see each other's stores: more is kept, never less.
    """
    used: set[Path] = set()
    with _RECORDERS_LOCK:
        _RECORDERS.append(used)
    try:
        yield used
    finally:
        with _RECORDERS_LOCK:
            _RECORDERS.remove(used)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link is removed, never what it points to (which may lie outside work_dir)
    else:
        shutil.rmtree(path)


def collect_stores(work_dir: Path, stem: str, used: set[Path], mode: str) -> list[Path]:
    """Remove ``stem``'s stores in ``work_dir`` after a successful run; return what was removed.

    Parameters
    ----------
    work_dir : Path
        The run's work_dir; only ``work_dir/<stem>/<store name>`` entries are candidates.
    stem : str
        Output stem.
    used : set of Path
        Stores the run used (from :func:`record_stores`): kept in ``stale`` mode, with their ``.done``.
    mode : {"stale", "keep", "all"}
        ``stale``: stores of other settings/inputs; ``all``: every store of the stem; ``keep``: nothing.

    The caller holds the stem's work_dir lock exclusively (no other run uses these stores).
    """
    if mode not in CLEANUP_MODES:
        raise ValueError(f"work_dir_cleanup must be one of {CLEANUP_MODES}, got {mode!r}")
    folder = Path(work_dir).absolute() / stem
    if mode == "keep" or not folder.is_dir() or folder.is_symlink():
        return []
    keep = {p.name for p in used if Path(p).parent == folder}
    keep |= {f"{name}.done" for name in keep}
    removed = []
    for entry in sorted(folder.iterdir()):
        if not STORE_NAME.match(entry.name) or (mode == "stale" and entry.name in keep):
            continue
        try:
            _remove(entry)
            removed.append(entry)
        except OSError as e:
            logger.warning("%s: cannot remove the stale store %s (%s)", stem, entry, e.strerror or e)
    return removed


def open_chunked(
    group_path: Path,
    name: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    markers: ChunkMarkers,
) -> Any:
    """The zarr array ``name`` of the group, reused when its shape, chunks and dtype match.

    A new (or mismatching) array is created empty and ``markers`` are cleared, so no marker outlives its data.
    """
    import zarr

    with _RECORDERS_LOCK:
        for used in _RECORDERS:
            used.add(Path(group_path).absolute())
    group = zarr.open_group(str(group_path), mode="a")
    if name in group:
        arr = group[name]
        if (tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype)) == (shape, chunks, np.dtype(dtype)):
            return arr
    markers.clear()
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True)


def write_chunk(
    blocks: list[np.ndarray],
    targets: list[Any],
    region: tuple[slice, ...],
    markers: ChunkMarkers,
    index: tuple[int, ...],
) -> int:
    """Write whole zarr chunks (``targets[i][region] = blocks[i]``), then the chunk's marker."""
    for block, target in zip(blocks, targets, strict=True):
        target[region] = np.asarray(block)
    markers.save(index)
    return 1


def chunk_writes(
    arrays: Any, targets: list[Any], markers: Any, todo: list[tuple[int, ...]], name: str | None = None
) -> list[Any]:
    """One delayed task per storage chunk in ``todo``: write that chunk of every array, then its marker.

    For arrays computed chunk by chunk (``map_blocks`` of a stored array): each chunk's chain runs once.
    """
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in arrays[0].chunks]
    import dask

    write = dask.delayed(write_chunk, pure=False)
    tasks = []
    for index in todo:
        region = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, index, strict=True))
        key = None if name is None else f"{name}-{'.'.join(map(str, index))}"
        tasks.append(write([a.blocks[index] for a in arrays], targets, region, markers, index,
                           dask_key_name=key))
    return tasks


def store_chunks(
    array: Any, store: Path, name: str, markers: ChunkMarkers, *, stem: str, kind: str, compute: Any
) -> tuple[Any, int]:
    """Write a lazy array into ``store/name`` chunk by chunk, resumably: the one resume loop of the stages.

    Parameters
    ----------
    array : dask.array.Array
        Computed chunk by chunk (each chunk's chain runs once).
    store, name : the zarr group and array (created, or reused when its shape, chunks and dtype match)
    markers : ChunkMarkers
        One done marker per chunk; chunks with one are not recomputed.
    stem, kind : str
        The tomogram and what is written (``labels``, ``multicut``), for the log and the task names.
    compute : callable
        Runs the write tasks (a tomogram's lane).

    Returns
    -------
    target : zarr.Array
        The written array.
    n_computed : int
        Chunks written by this call.
    """
    chunks = tuple(int(c[0]) for c in array.chunks)
    target = open_chunked(store, name, shape=tuple(array.shape), chunks=chunks, dtype=array.dtype,
                          markers=markers)
    every = list(np.ndindex(*array.numblocks))
    todo = [i for i in every if not markers.done(i)]
    if len(todo) < len(every):
        logger.info("%s: %s: %d of %d chunks done in an earlier run", stem, kind, len(every) - len(todo),
                    len(every))
    compute(*chunk_writes([array], [target], markers, todo, name=f"{kind}-{stem}-{store.name}"))
    return target, len(todo)
