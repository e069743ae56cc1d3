"""Every output file of ``instance_predict``, written chunk by chunk and atomically.

CryoSiam writes ``<stem>_instance_preds.h5:/instances``, ``<stem>_instance_regions.csv`` and, optionally,
``<stem>_preds.h5`` (raw maps). We write the same files with the same layout (chunked and gzip-compressed
HDF5, which h5py reads the same way), plus files users can open directly: ``<stem>.ome.zarr`` (tomogram,
instances as an OME-Zarr label image, raw maps), ``<stem>_instances.mrc`` and a STAR file of centroids.

Every writer takes lazy dask arrays (z, y, x) and never holds more than a few chunks in memory. Each chunk
of ``labels`` is computed once per writer: pass labels that are cheap to read (stored to zarr or persisted),
not a graph that recomputes a global merge for every chunk. Each writer writes into a hidden temporary
sibling and renames it onto the final path only when it is complete (:func:`atomic_output`).
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import h5py
import numpy as np

from cryosiam_dask._backend import to_numpy
from cryosiam_dask.errors import NotSupportedError, OutputError

logger = logging.getLogger(__name__)

REGION_COLUMNS = (
    "label", "area", "bbox-0", "bbox-1", "bbox-2", "bbox-3", "bbox-4", "bbox-5",
    "centroid-0", "centroid-1", "centroid-2",
)
"""CryoSiam's region-table columns, in order (``regionprops_table`` names, z, y, x voxel order)."""

MAP_DATASETS = ("foreground", "distances", "boundaries")
"""Dataset names of CryoSiam's ``<stem>_preds.h5``."""

FINGERPRINT_ATTR = "cryosiam_dask_fingerprint"
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


# ---------------------------------------------------------------------------------------- region table
def _block_stats(block: Any, offset: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per-label partial statistics of one chunk: ids, voxel counts, bbox min/max (inclusive), coord sums.

    Memory: the chunk, its dense local ids (int32) and per-plane temporaries, i.e. about 2-3 chunk sizes.
    """
    from scipy import ndimage

    block = to_numpy(block)
    ids = np.unique(block)
    shift = 0 if ids.size and ids[0] == 0 else 1  # local id 0 = background, 1..n = ids
    ids = ids[1 - shift :]
    n = ids.size
    out = {
        "label": ids.astype(np.int64),
        "count": np.zeros(n, np.int64),
        "min": np.zeros((n, 3), np.int64),
        "max": np.zeros((n, 3), np.int64),
        "sum": np.zeros((n, 3), np.int64),
    }
    if n == 0:
        return out
    search = ids if shift else np.r_[np.zeros(1, ids.dtype), ids]
    local = np.empty(block.shape, np.int32)
    yy, xx = (c.astype(np.float64) for c in np.indices(block.shape[1:]))
    sums = np.zeros((n + 1, 3), np.float64)
    for z in range(block.shape[0]):  # one plane at a time: counts and y/x sums, z sums from the counts
        plane = np.searchsorted(search, block[z]).astype(np.int32) + shift
        local[z] = plane
        counts = np.bincount(plane.ravel(), minlength=n + 1)
        out["count"] += counts[1:]
        sums[:, 0] += z * counts
        sums[:, 1] += np.bincount(plane.ravel(), weights=yy.ravel(), minlength=n + 1)
        sums[:, 2] += np.bincount(plane.ravel(), weights=xx.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(local, max_label=n)
    out["min"] = np.array([[s.start for s in box] for box in boxes], np.int64) + offset
    out["max"] = np.array([[s.stop - 1 for s in box] for box in boxes], np.int64) + offset
    out["sum"] = np.rint(sums[1:]).astype(np.int64) + out["count"][:, None] * np.asarray(offset, np.int64)
    return out


def _merge_stats(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Combine partial statistics of several chunks into one row per label id (sorted)."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cat["label"], kind="stable")
    cat = {k: v[order] for k, v in cat.items()}
    if cat["label"].size == 0:
        return cat
    starts = np.flatnonzero(np.r_[True, np.diff(cat["label"]) != 0])
    return {
        "label": cat["label"][starts],
        "count": np.add.reduceat(cat["count"], starts),
        "min": np.minimum.reduceat(cat["min"], starts, axis=0),
        "max": np.maximum.reduceat(cat["max"], starts, axis=0),
        "sum": np.add.reduceat(cat["sum"], starts, axis=0),
    }


def region_table(labels: da.Array, *, fan_in: int = 8) -> dict[str, np.ndarray]:
    """CryoSiam's region table of a chunked label volume, without loading it whole.

    Each chunk gives per-label partial statistics (voxel count, bounding-box min/max, coordinate sums),
    which a tree reduction of `fan_in` parts per step combines, so labels spanning chunks are counted once.

    Parameters
    ----------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background, unique across the whole volume (not per chunk). numpy or cupy chunks.
    fan_in : int, default 8
        Partial tables merged per reduction step.

    Returns
    -------
    dict of str to (N,) ndarray
        Exactly ``regionprops_table(labels, properties=['label', 'area', 'bbox', 'centroid'])``
        (skimage.measure) of the whole volume: keys :data:`REGION_COLUMNS`; ``label`` and ``bbox-*``
        int64, ``area`` and ``centroid-*`` float64; bbox and centroids in voxels, (z, y, x), bbox ends
        exclusive; one row per id, sorted.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> lab = da.from_array(np.array([[[0, 1, 1, 2]]], np.uint32), chunks=(1, 1, 2))
    >>> region_table(lab)["area"]
    array([2., 1.])
    """
    labels = _check_volume(labels, "labels")
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in labels.chunks]
    blocks = labels.to_delayed()
    parts = [
        dask.delayed(_block_stats)(blocks[b], tuple(int(s[j]) for s, j in zip(starts, b, strict=True)))
        for b in np.ndindex(*labels.numblocks)
    ]
    while len(parts) > 1:
        parts = [dask.delayed(_merge_stats)(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    (stats,) = dask.compute(parts[0])
    stats = _merge_stats(stats)  # also covers a single chunk
    count = stats["count"]
    table = {"label": stats["label"], "area": count.astype(np.float64)}
    for axis in range(3):
        table[f"bbox-{axis}"] = stats["min"][:, axis]
    for axis in range(3):
        table[f"bbox-{axis + 3}"] = stats["max"][:, axis] + 1
    for axis in range(3):
        table[f"centroid-{axis}"] = stats["sum"][:, axis].astype(np.float64) / count
    return table


def write_regions_csv(path: str | os.PathLike[str], table: dict[str, np.ndarray]) -> Path:
    """Write ``<stem>_instance_regions.csv`` exactly as CryoSiam does (``csv.writer``, CRLF, header first).

    Parameters
    ----------
    path : str or PathLike
        Output file.
    table : dict of str to (N,) ndarray
        From :func:`region_table` (or ``regionprops_table``); the columns :data:`REGION_COLUMNS` are
        written in that order. Values are written as Python prints them (``38.0`` for a float area,
        the shortest repr for centroids).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    missing = [c for c in REGION_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"region table for {path} lacks columns {missing}")
    columns = [np.asarray(table[c]).tolist() for c in REGION_COLUMNS]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(REGION_COLUMNS)
        writer.writerows(zip(*columns, strict=True))
    return path


# ------------------------------------------------------------------------------------------------ HDF5
def _h5_chunks(array: da.Array) -> tuple[int, ...]:
    return tuple(max(1, min(c, 64)) for c in array.chunksize)


def write_instances_h5(path: str | os.PathLike[str], labels: da.Array) -> Path:
    """Write ``<stem>_instance_preds.h5`` with dataset ``instances`` (uint32, (Z, Y, X)), chunk by chunk.

    The layout is CryoSiam's (same dataset name, dtype and shape); the dataset is HDF5-chunked (at most 64³)
    and gzip-compressed, which h5py reads like CryoSiam's contiguous dataset. Chunks are computed on the dask
    scheduler (a distributed client if one is active) and written by this process only (h5py is not
    thread-safe).

    Parameters
    ----------
    path : str or PathLike
        Output file.
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    labels = _check_volume(labels, "labels")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset(
            "instances", shape=labels.shape, dtype=np.uint32, chunks=_h5_chunks(labels),
            compression="gzip", compression_opts=1, shuffle=True,
        )
        for slices, (block,) in _iter_blocks([labels]):
            dset[slices] = _as_uint32(block, path)
    return path


def _fingerprint_text(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, sort_keys=True, default=str)


def write_raw_predictions_h5(
    path: str | os.PathLike[str],
    foreground: da.Array,
    distance: da.Array,
    boundary: da.Array,
    *,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write ``<stem>_preds.h5``: datasets ``foreground``, ``distances``, ``boundaries`` (float32, (Z, Y, X)).

    Parameters
    ----------
    path : str or PathLike
        Output file.
    foreground, distance, boundary : (Z, Y, X) dask.array.Array of float32
        The three maps as CryoSiam saves them (sigmoid probability, raw distance, sigmoid probability).
        They are computed together chunk by chunk, so a graph they share runs once.
    attrs : dict, optional
        Settings fingerprint (JSON-serialisable: checkpoint path, size and mtime, normalisation, tiling,
        mask), stored as the file attribute :data:`FINGERPRINT_ATTR` and checked by
        :func:`read_raw_predictions`.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    maps = [_check_volume(a, n) for a, n in zip((foreground, distance, boundary), MAP_DATASETS, strict=True)]
    if len({m.shape for m in maps}) != 1:
        raise ValueError(f"raw maps for {path} differ in shape: {[m.shape for m in maps]}")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        dsets = [
            f.create_dataset(name, shape=maps[0].shape, dtype=np.float32, chunks=_h5_chunks(maps[0]),
                             compression="gzip", compression_opts=1, shuffle=True)
            for name in MAP_DATASETS
        ]
        if attrs is not None:
            f.attrs[FINGERPRINT_ATTR] = _fingerprint_text(attrs)
        for slices, blocks in _iter_blocks(maps):
            for dset, block in zip(dsets, blocks, strict=True):
                dset[slices] = block.astype(np.float32, copy=False)
    return path


def read_raw_predictions(
    path: str | os.PathLike[str],
    expected_fingerprint: dict[str, Any],
    *,
    shape: tuple[int, int, int] | None = None,
    chunks: Any = None,
) -> tuple[da.Array, da.Array, da.Array] | None:
    """Return the saved raw maps if they were made with the same settings, else None (reason logged).

    CryoSiam reuses an existing ``<stem>_preds.h5`` blindly. We reuse a file we wrote only if its fingerprint
    equals `expected_fingerprint`; a file without a fingerprint (written by CryoSiam) is reused, as CryoSiam
    does, with a warning.

    Parameters
    ----------
    path : str or PathLike
        ``<stem>_preds.h5``.
    expected_fingerprint : dict
        The settings fingerprint of this run (see :func:`write_raw_predictions_h5`).
    shape : (3,) tuple of int, optional
        Expected (Z, Y, X) shape; a file of another shape is not reused.
    chunks : optional
        Dask chunks of the returned arrays; default the HDF5 chunks, or ``"auto"`` for a contiguous dataset.

    Returns
    -------
    tuple of three (Z, Y, X) dask.array.Array of float32, or None
        ``(foreground, distance, boundary)`` read lazily from the file (kept open while they are used).
    """
    path = Path(path)
    if not path.is_file():
        logger.info("no raw predictions at %s: the network will run", path)
        return None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        logger.warning("raw predictions %s cannot be read (%s): the network will run", path, e)
        return None
    missing = [n for n in MAP_DATASETS if n not in f]
    shapes = {f[n].shape for n in MAP_DATASETS if n not in missing}
    stored = f.attrs.get(FINGERPRINT_ATTR)
    reason = None
    if missing:
        reason = f"lacks datasets {missing}"
    elif len(shapes) != 1 or (shape is not None and shapes != {tuple(shape)}):
        reason = f"has shape {sorted(shapes)}, expected {shape}"
    elif stored is None:
        logger.warning("reusing raw predictions %s written without settings fingerprint (as CryoSiam does); "
                       "delete it if the checkpoint or settings changed", path)
    elif stored != _fingerprint_text(expected_fingerprint):
        old, new = json.loads(stored), json.loads(_fingerprint_text(expected_fingerprint))
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        reason = f"was made with other settings (differ: {', '.join(keys)})"
    if reason is not None:
        logger.info("not reusing raw predictions %s: it %s; the network will run", path, reason)
        f.close()
        return None
    out = []
    for name in MAP_DATASETS:
        dset = f[name]
        out.append(da.from_array(dset, chunks=chunks or dset.chunks or "auto", name=f"{path}:{name}"))
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------------------- MRC
def write_mrc_labels(
    path: str | os.PathLike[str],
    labels: da.Array,
    *,
    voxel_size: float | tuple[float, float, float],
    max_label: int | None = None,
) -> Path:
    """Write ``<stem>_instances.mrc`` (for Amira, IMOD, ChimeraX), chunk by chunk through a memory map.

    MRC has no 32-bit integer mode: ids up to 65535 are stored as mode 6 (uint16), larger ones as mode 2
    (float32), exact up to 2**24 = 16777216. More ids than that cannot be stored exactly: use the HDF5 or
    OME-Zarr output.

    Parameters
    ----------
    path : str or PathLike
        Output file.
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background.
    voxel_size : float or (3,) tuple of float
        Voxel size in Å, one value or (z, y, x), as in the tomogram's header.
    max_label : int, optional
        Largest id (e.g. from :func:`region_table`); computed from `labels` when not given.

    Returns
    -------
    Path
        The written file.
    """
    import mrcfile

    path = Path(path)
    labels = _check_volume(labels, "labels")
    if max_label is None:
        max_label = int(labels.max().compute()) if labels.size else 0
    if max_label >= 2**24:
        raise NotSupportedError(f"{path}: {max_label} instance ids do not fit an MRC file exactly "
                                "(float32 holds ids up to 16777216); use the .h5 or .ome.zarr output")
    mode = 6 if max_label < 2**16 else 2  # uint16, else float32
    vz, vy, vx = (voxel_size,) * 3 if np.isscalar(voxel_size) else tuple(voxel_size)
    lo, hi, total, squares = np.inf, -np.inf, 0.0, 0.0
    with atomic_output(path) as tmp:
        mrcfile.new_mmap(str(tmp), shape=labels.shape, mrc_mode=mode, overwrite=True).close()
        mrc, step = None, _in_flight()
        try:
            for i, (slices, (block,)) in enumerate(_iter_blocks([labels]), start=1):
                if block.size and int(block.max()) > max_label:
                    raise OutputError(f"{path}: label id {int(block.max())} exceeds max_label {max_label}")
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
                total += float(block.sum(dtype=np.float64))
                squares += sum(float(np.square(plane, dtype=np.float64).sum()) for plane in block)
                if mrc is None:
                    mrc = mrcfile.mmap(str(tmp), mode="r+")
                mrc.data[slices] = block  # cast to uint16/float32 on assignment
                if i % step == 0:  # unmap now and then, so written pages do not pile up in RSS
                    mrc.close()
                    mrc = None
        finally:
            if mrc is not None:
                mrc.close()
        with mrcfile.mmap(str(tmp), mode="r+") as mrc:
            mrc.voxel_size = (vx, vy, vz)
            n = max(labels.size, 1)
            mean = total / n
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = np.sqrt(max(squares / n - mean * mean, 0.0))
    return path


# ------------------------------------------------------------------------------------------------ STAR
def write_star(
    path: str | os.PathLike[str],
    table: dict[str, np.ndarray],
    *,
    voxel_size: float | None = None,
    tomogram_name: str | None = None,
) -> Path:
    """Write instance centroids as a STAR file for RELION / Warp (block ``data_particles``).

    Columns: ``rlnCoordinateX/Y/Z`` (voxels, 0-based; x = centroid-2, y = centroid-1, z = centroid-0),
    ``rlnMicrographName`` (if `tomogram_name` is given), ``rlnImagePixelSize`` (Å, if `voxel_size` is given),
    ``cryosiamInstanceId`` (label id) and ``cryosiamVolumeVoxels`` (voxel count).

    Parameters
    ----------
    path : str or PathLike
        Output file.
    table : dict of str to (N,) ndarray
        From :func:`region_table`.
    voxel_size : float, optional
        Voxel size in Å.
    tomogram_name : str, optional
        Tomogram name, e.g. ``TS_01.mrc``.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    cols: dict[str, list[str]] = {}
    for axis, name in ((2, "X"), (1, "Y"), (0, "Z")):
        cols[f"rlnCoordinate{name}"] = [f"{v:.6f}" for v in np.asarray(table[f"centroid-{axis}"], float)]
    n = len(cols["rlnCoordinateX"])
    if tomogram_name is not None:
        if any(c.isspace() for c in tomogram_name) or not tomogram_name:
            raise ValueError(f"tomogram name {tomogram_name!r} for {path} must be non-empty without spaces")
        cols["rlnMicrographName"] = [tomogram_name] * n
    if voxel_size is not None:
        cols["rlnImagePixelSize"] = [f"{float(voxel_size):.6f}"] * n
    cols["cryosiamInstanceId"] = [str(int(v)) for v in table["label"]]
    cols["cryosiamVolumeVoxels"] = [str(int(v)) for v in table["area"]]
    lines = ["", "# version 30001", "", "data_particles", "", "loop_"]
    lines += [f"_{name} #{i}" for i, name in enumerate(cols, start=1)]
    lines += ["\t".join(row) for row in zip(*cols.values(), strict=True)]
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n\n")
    return path


# -------------------------------------------------------------------------------------------- OME-Zarr
def _axes() -> list[dict[str, str]]:
    return [{"name": a, "type": "space", "unit": "angstrom"} for a in ("z", "y", "x")]


def _set_ome(group: Any, attrs: dict[str, Any], version: str) -> None:
    """Write NGFF attributes: top level in 0.4 (zarr v2), under ``"ome"`` plus ``version`` in 0.5 (v3)."""
    if version == "0.4":
        group.attrs.update(attrs)
    else:
        ome = dict(group.attrs.get("ome", {}))
        ome.update(attrs)
        ome["version"] = "0.5"
        group.attrs["ome"] = ome


def _write_multiscale(
    group: Any, data: da.Array, *, voxel_size: tuple[float, float, float], levels: int, is_label: bool,
    version: str, name: str,
) -> None:
    """Write `data` and its 2x-downsampled levels into `group`, each level made from the stored one."""
    datasets = []
    chunks = tuple(min(c, 128) for c in data.chunksize) if is_label else data.chunksize
    level = data
    for k in range(levels):
        if k > 0:
            prev = da.from_zarr(group[str(k - 1)])
            shape = tuple(s // 2 for s in prev.shape)
            if min(shape) == 0:
                break
            if is_label:
                level = prev[::2, ::2, ::2][: shape[0], : shape[1], : shape[2]]
            else:
                level = da.coarsen(np.mean, prev, {0: 2, 1: 2, 2: 2}, trim_excess=True).astype(data.dtype)
        level_chunks = tuple(min(c, s) for c, s in zip(chunks, level.shape, strict=True))
        level = level.rechunk(level_chunks)
        kwargs: dict[str, Any] = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        if version == "0.5":
            kwargs = {"dimension_names": ["z", "y", "x"]}
        arr = group.create_array(str(k), shape=level.shape, chunks=level_chunks, dtype=level.dtype,
                                 fill_value=0, **kwargs)
        # chunks equal the zarr chunks, so tasks never share a zarr chunk (da.to_zarr would rechunk to "auto")
        da.store(level, arr, lock=False)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v * 2**k) for v in voxel_size]}]})
    multiscale: dict[str, Any] = {"name": name, "axes": _axes(), "datasets": datasets}
    if version == "0.4":
        multiscale["version"] = "0.4"
    _set_ome(group, {"multiscales": [multiscale]}, version)


def write_ome_zarr(
    path: str | os.PathLike[str],
    tomogram: da.Array,
    labels: da.Array,
    *,
    voxel_size: float | tuple[float, float, float],
    maps: dict[str, da.Array] | None = None,
    levels: int = 3,
    ngff_version: Literal["0.4", "0.5"] = "0.4",
) -> Path:
    """Write ``<stem>.ome.zarr``: the tomogram as a multiscale image, the instances as its label image.

    Layout: ``0, 1, ...`` tomogram levels (2x mean downsampling); ``labels/instances/0, 1, ...`` instance ids
    (2x stride subsampling, uint32) with ``image-label`` metadata; ``maps/<name>/0`` each raw map, a one-level
    multiscale image. Axes are z, y, x in ångström with ``scale`` = voxel size times 2**level.
    NGFF 0.4 (zarr v2, the default) opens in napari-ome-zarr, Fiji/MoBIE and neuroglancer; 0.5 (zarr v3) in
    napari-ome-zarr and recent ome-zarr-py. Arrays are written chunk by chunk (``da.store``); each coarser
    level is read back from the level written before, so `labels` is computed once.

    Parameters
    ----------
    path : str or PathLike
        Output directory; an existing one is replaced when the new one is complete.
    tomogram : (Z, Y, X) dask.array.Array
        The input tomogram (any dtype, usually float32).
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background.
    voxel_size : float or (3,) tuple of float
        Voxel size in Å, one value or (z, y, x).
    maps : dict of str to (Z, Y, X) dask.array.Array of float32, optional
        Raw maps to add, e.g. ``{"foreground": fg, "distances": dist, "boundaries": bnd}``.
    levels : int, default 3
        Pyramid levels (fewer if the volume gets smaller than 1 voxel along an axis).
    ngff_version : {"0.4", "0.5"}, default "0.4"
        OME-Zarr version: 0.4 on zarr v2, 0.5 on zarr v3.

    Returns
    -------
    Path
        The written directory.
    """
    import zarr

    path = Path(path)
    tomogram, labels = _check_volume(tomogram, "tomogram"), _check_volume(labels, "labels")
    maps = {k: _check_volume(v, f"maps[{k!r}]") for k, v in (maps or {}).items()}
    for name, arr in [("labels", labels), *maps.items()]:
        if arr.shape != tomogram.shape:
            raise ValueError(f"{path}: {name} shape {arr.shape} differs from tomogram shape {tomogram.shape}")
    if ngff_version not in ("0.4", "0.5"):
        raise ValueError(f"ngff_version must be '0.4' or '0.5', got {ngff_version!r}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    vs = (float(voxel_size),) * 3 if np.isscalar(voxel_size) else tuple(float(v) for v in voxel_size)
    zarr_format = 2 if ngff_version == "0.4" else 3
    labels = labels.astype(np.uint32) if labels.dtype != np.uint32 else labels
    opts = {"voxel_size": vs, "version": ngff_version}
    with atomic_output(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        _write_multiscale(root, tomogram, levels=levels, is_label=False, name=path.name.split(".")[0], **opts)
        label_root = root.create_group("labels")
        _set_ome(label_root, {"labels": ["instances"]}, ngff_version)
        inst = label_root.create_group("instances")
        _write_multiscale(inst, labels, levels=levels, is_label=True, name="instances", **opts)
        image_label: dict[str, Any] = {"source": {"image": "../../"}}
        if ngff_version == "0.4":
            image_label["version"] = "0.4"
        _set_ome(inst, {"image-label": image_label}, ngff_version)
        if maps:
            map_root = root.create_group("maps")
            for name, arr in maps.items():
                group = map_root.create_group(name)
                _write_multiscale(group, arr, levels=1, is_label=False, name=name, **opts)
    return path
