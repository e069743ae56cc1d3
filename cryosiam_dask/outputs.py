"""Every output file of ``instance_predict``, written chunk by chunk and atomically.

CryoSiam writes ``<stem>_instance_preds.h5:/instances``, ``<stem>_instance_regions.csv`` and, optionally,
``<stem>_preds.h5`` (raw maps). We write the same files with the same layout (chunked and gzip-compressed
HDF5, which h5py reads the same way), plus files users can open directly: ``<stem>.ome.zarr`` (tomogram,
instances as an OME-Zarr label image, raw maps), ``<stem>_instances.mrc`` and a STAR file of centroids.

Every writer takes lazy dask arrays (z, y, x) and never holds more than a few chunks in memory. Each chunk
of ``labels`` is computed once per writer: pass labels that are cheap to read (stored to zarr or persisted),
not a graph that recomputes a global merge for every chunk. Each writer writes into a hidden temporary
sibling and renames it onto the final path only when it is complete (:func:`atomic_output`).

This module is the public door: the region table lives in :mod:`cryosiam_dask.regions`, the OME-Zarr writer
in :mod:`cryosiam_dask.ome_zarr` and the shared atomic-write helpers in ``_output_common``; all are
re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np

from cryosiam_dask._output_common import _as_uint32, _check_volume, _in_flight, _iter_blocks, atomic_output
from cryosiam_dask.errors import NotSupportedError, OutputError
from cryosiam_dask.ome_zarr import write_ome_zarr
from cryosiam_dask.regions import REGION_COLUMNS, region_table, write_regions_csv

logger = logging.getLogger(__name__)

__all__ = [
    "FINGERPRINT_ATTR",
    "MAP_DATASETS",
    "REGION_COLUMNS",
    "atomic_output",
    "read_raw_predictions",
    "region_table",
    "write_instances_h5",
    "write_mrc_labels",
    "write_ome_zarr",
    "write_raw_predictions_h5",
    "write_regions_csv",
    "write_star",
]

MAP_DATASETS = ("foreground", "distances", "boundaries")
"""Dataset names of CryoSiam's ``<stem>_preds.h5``."""

FINGERPRINT_ATTR = "cryosiam_dask_fingerprint"


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

