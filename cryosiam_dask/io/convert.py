"""MRC/REC -> OME-Zarr conversion, streamed slab by slab (memory follows the chunk, not the volume).

``<work_dir>/<stem>.zarr`` is a zarr v3 group holding OME-Zarr (NGFF 0.5) ``multiscales`` metadata (axes z, y,
x of type ``space`` in ``angstrom``, scale = voxel size, translation = header origin) and one array ``"0"``.
Our own attributes (source path, size, mtime_ns, dtype) sit under the ``cryosiam_dask`` key of the group
attributes and decide whether an existing conversion can be reused.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import zarr

from cryosiam_dask._types import DEFAULT_CHUNKS, ShapeZYX
from cryosiam_dask.errors import InputFileError
from cryosiam_dask.io.mrc import MrcInfo, check_tomogram, stem_of
from cryosiam_dask.io.ome import write_image_metadata

__all__ = ["OUR_KEY", "conversion_is_current", "is_conversion", "tomogram_to_zarr"]

logger = logging.getLogger(__name__)

OME_VERSION = "0.5"
OUR_KEY = "cryosiam_dask"


def _replace_atomically(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``; an older ``final`` is removed only after the move."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tomogram_to_zarr(
    path: str | os.PathLike, zarr_path: str | os.PathLike, *, chunk_size: ShapeZYX = DEFAULT_CHUNKS
) -> zarr.Array:
    """Convert an MRC/REC tomogram to an OME-Zarr group, streaming ``chunk_size[0]`` z-planes at a time.

    Parameters
    ----------
    path : str or PathLike
        Input ``.mrc`` / ``.rec``. Uncompressed files are memory-mapped one slab at a time, so peak memory
        is about one slab (``chunk_size[0] * ny * nx`` voxels). ``.gz`` / ``.bz2`` files cannot be
        memory-mapped and are loaded whole.
    zarr_path : str or PathLike
        Output group. Written under a temporary name in the same folder and renamed when complete, so a
        reader never sees a partial conversion; an existing group there is replaced.
    chunk_size : (3,) tuple of int, default (128, 256, 256)
        zarr chunks (z, y, x), clipped to the volume shape.

    Returns
    -------
    zarr.Array
        Array ``"0"`` of the group: (Z, Y, X), stored dtype (native byte order), zstd-compressed.
    """
    info = check_tomogram(path)
    src = info.path
    zarr_path = Path(zarr_path)
    zarr_path.parent.mkdir(parents=True, exist_ok=True)
    chunks = tuple(int(min(c, s)) for c, s in zip(chunk_size, info.shape, strict=True))
    tmp = zarr_path.with_name(f".{zarr_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    stat = src.stat()
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        arr = group.create_array(
            "0",
            shape=info.shape,
            chunks=chunks,
            dtype=info.dtype,
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
            dimension_names=("z", "y", "x"),
            fill_value=0,
        )
        _copy_slabs(info, arr, chunks[0])
        write_image_metadata(group, levels=1, voxel_size=info.voxel_size, origin=info.origin,
                             name=stem_of(src), version=OME_VERSION)
        group.attrs.update(
            {
                OUR_KEY: {
                    "source_path": str(src.resolve()),
                    "source_size": stat.st_size,
                    "source_mtime_ns": stat.st_mtime_ns,
                    "dtype": info.dtype.str,
                    "voxel_size": list(info.voxel_size),
                    "origin": list(info.origin),
                },
            }
        )
        _replace_atomically(tmp, zarr_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s (%s %s, chunks %s)", src, zarr_path, info.shape, info.dtype, chunks)
    return zarr.open_array(zarr_path / "0", mode="r")


def _copy_slabs(info: MrcInfo, arr: zarr.Array, slab: int) -> None:
    """Copy the MRC data into ``arr`` slab by slab (a fresh mapping per slab keeps resident pages bounded)."""
    nz = info.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if info.compressed:
            with mrcfile.open(info.path, mode="r", permissive=True) as mrc:
                data = _checked_data(info, mrc.data)
                for z0 in range(0, nz, slab):
                    arr[z0 : z0 + slab] = np.asarray(data[z0 : z0 + slab], dtype=info.dtype)
            return
        rows = arr.chunks[1]  # a slab is tiled along y too: memory follows the chunk, not the plane size
        for z0 in range(0, nz, slab):
            with mrcfile.mmap(info.path, mode="r", permissive=True) as mrc:
                data = _checked_data(info, mrc.data)
                for y0 in range(0, info.shape[1], rows):
                    block = data[z0 : z0 + slab, y0 : y0 + rows]
                    arr[z0 : z0 + slab, y0 : y0 + rows] = (
                        block if block.dtype == info.dtype else block.astype(info.dtype)
                    )
                    del block
                del data


def _checked_data(info: MrcInfo, data: np.ndarray | None) -> np.ndarray:
    if data is None or tuple(data.shape) != info.shape:
        found = None if data is None else tuple(data.shape)
        raise InputFileError(
            f"{info.path}: truncated or unreadable MRC data (read {found}, header {info.shape})"
        )
    return data


def _our_attrs(zarr_path: Path) -> tuple[Any, dict[str, Any]] | None:
    """The group and the attributes this package wrote into a conversion, or None (not ours, unreadable)."""
    try:
        group = zarr.open_group(zarr_path, mode="r")
        return group, dict(group.attrs)[OUR_KEY]
    except Exception:
        return None


def is_conversion(zarr_path: Path) -> bool:
    """Whether `zarr_path` is a conversion this package wrote (never a user's own zarr input)."""
    return Path(zarr_path).is_dir() and _our_attrs(zarr_path) is not None


def conversion_is_current(zarr_path: Path, src: Path) -> bool:
    """Whether `zarr_path` is our conversion of `src` at its current size and mtime."""
    found = _our_attrs(zarr_path)
    if found is None:
        return False
    group, ours = found
    try:
        stat = src.stat()
        return (
            "0" in group
            and ours.get("source_size") == stat.st_size
            and ours.get("source_mtime_ns") == stat.st_mtime_ns
        )
    except Exception:  # anything unreadable is simply converted again
        return False
