"""CryoSiam's own HDF5 files: ``<stem>_instance_preds.h5`` and the raw maps ``<stem>_preds.h5``, by chunks.

CryoSiam writes ``<stem>_instance_preds.h5:/instances``, ``<stem>_instance_regions.csv`` and, optionally,
``<stem>_preds.h5`` (raw maps). We write the same files with the same layout (chunked and gzip-compressed
HDF5, which h5py reads the same way), plus files users can open directly: ``<stem>.ome.zarr`` (tomogram,
instances as an OME-Zarr label image, raw maps), ``<stem>_instances.mrc`` and a STAR file of centroids.

Every writer takes lazy dask arrays (z, y, x) and never holds more than a few chunks in memory. Each chunk
of ``labels`` is computed once per writer: pass labels that are cheap to read (stored to zarr or persisted),
not a graph that recomputes a global merge for every chunk. Each writer writes into a hidden temporary
sibling and renames it onto the final path only when it is complete (:func:`atomic_output`).

This module holds CryoSiam's own HDF5 files; the region table and its CSV are in
:mod:`cryosiam_dask.outputs.regions`, the viewer formats in :mod:`~cryosiam_dask.outputs.ome_zarr` and
:mod:`~cryosiam_dask.outputs.formats`; :mod:`cryosiam_dask.outputs` re-exports every writer.
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

from cryosiam_dask.outputs.atomic import _as_uint32, _check_volume, _iter_blocks, atomic_output

logger = logging.getLogger(__name__)

__all__ = [
    "FINGERPRINT_ATTR",
    "GEOMETRY_ATTRS",
    "MAP_DATASETS",
    "read_raw_predictions",
    "write_instances_h5",
    "write_raw_predictions_h5",
]

MAP_DATASETS = ("foreground", "distances", "boundaries")
"""Dataset names of CryoSiam's ``<stem>_preds.h5``."""

FINGERPRINT_ATTR = "cryosiam_dask_fingerprint"
GEOMETRY_ATTRS = ("voxel_size", "origin")
"""File attributes (z, y, x, Å) we add to both h5 files so that viewers overlay them on the tomogram
(CryoSiam's readers ignore them; files CryoSiam wrote lack them)."""


def _write_geometry(f: h5py.File, voxel_size: Any, origin: Any) -> None:
    for name, value in zip(GEOMETRY_ATTRS, (voxel_size, origin), strict=True):
        if value is not None:
            v = (float(value),) * 3 if np.isscalar(value) else tuple(float(x) for x in value)
            f.attrs[name] = np.asarray(v, np.float64)


# ------------------------------------------------------------------------------------------------ HDF5
def _h5_chunks(array: da.Array) -> tuple[int, ...]:
    return tuple(max(1, min(c, 64)) for c in array.chunksize)


def write_instances_h5(
    path: str | os.PathLike[str],
    labels: da.Array,
    *,
    voxel_size: float | tuple[float, float, float] | None = None,
    origin: tuple[float, float, float] | None = None,
) -> Path:
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
    voxel_size, origin : (z, y, x) floats in Å, optional
        The tomogram's, stored as file attributes ``voxel_size`` and ``origin`` (for viewers).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    labels = _check_volume(labels, "labels")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        _write_geometry(f, voxel_size, origin)
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
    voxel_size: float | tuple[float, float, float] | None = None,
    origin: tuple[float, float, float] | None = None,
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
    voxel_size, origin : (z, y, x) floats in Å, optional
        The tomogram's, stored as file attributes ``voxel_size`` and ``origin`` (for viewers).

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
        _write_geometry(f, voxel_size, origin)
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
