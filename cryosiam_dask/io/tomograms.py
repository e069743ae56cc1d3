"""Opening a tomogram as a chunked dask array: MRC/REC converted to zarr once (reused while the source is
unchanged), zarr inputs (OME-Zarr group or plain array) used in place.

Every array is (z, y, x). Tomograms keep their stored dtype (CryoSiam's clip/normalisation happens later, per
chunk). Voxel sizes and origins are in ångström, in (z, y, x) order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import zarr

from cryosiam_dask._types import DEFAULT_CHUNKS, ShapeZYX
from cryosiam_dask.errors import InputFileError
from cryosiam_dask.io.convert import OUR_KEY, conversion_is_current, tomogram_to_zarr
from cryosiam_dask.io.mrc import TOMOGRAM_SUFFIXES, MrcInfo, check_tomogram, stem_of
from cryosiam_dask.io.ome import read_scale_translation

__all__ = [
    "MrcInfo",
    "Tomogram",
    "check_tomogram",
    "open_tomogram",
    "stem_of",
    "tomogram_to_zarr",
]

logger = logging.getLogger(__name__)


@dataclass
class Tomogram:
    """A tomogram ready for chunked processing.

    Attributes
    ----------
    data : (Z, Y, X) dask.array.Array
        Stored dtype, chunked as requested, backed by a zarr array (picklable for distributed workers).
    voxel_size : (3,) tuple of float
        (z, y, x) in Å.
    origin : (3,) tuple of float
        (z, y, x) in Å.
    path : Path or reference
        The input file as given (MRC/REC or zarr), or a reference read in place
        (:class:`~cryosiam_dask.io.remote.ZarrUrl`, :class:`~cryosiam_dask.io.copick.CopickTomogram`).
    stem : str
        Output file stem: the basename without its extension, as CryoSiam names outputs.
    zarr_path : Path or None
        The local zarr group or array that backs ``data`` (None for a reference).
    """

    data: da.Array
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    path: Path | Any
    stem: str
    zarr_path: Path | None


def _open_zarr_node(path: Path) -> zarr.Array | zarr.Group:
    try:
        return zarr.open(path, mode="r")
    except Exception as e:
        raise InputFileError(f"{path}: not a readable zarr array or group ({type(e).__name__}: {e})") from e


def _ome_scale_translation(
    node: zarr.Array | zarr.Group,
) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """Voxel size and origin (z, y, x, Å) from NGFF 0.5 (``ome`` key) or 0.4 multiscales, else 1 and 0."""
    attrs = dict(node.attrs)
    found = read_scale_translation(attrs)
    if found is not None:
        return found  # type: ignore[return-value]
    ours = attrs.get(OUR_KEY, {})
    return tuple(ours.get("voxel_size", (1.0, 1.0, 1.0))), tuple(ours.get("origin", (0.0, 0.0, 0.0)))


def level0(node: zarr.Array | zarr.Group, where: str) -> zarr.Array:
    """Scale 0 of an OME-Zarr group (the first ``multiscales`` dataset, else ``"0"``), or the array itself."""
    if not isinstance(node, zarr.Group):
        return node
    attrs = dict(node.attrs)
    try:
        path = attrs.get("ome", attrs)["multiscales"][0]["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError):
        path = "0"
    if path not in node:
        raise InputFileError(
            f"{where}: zarr group has no array '{path}' (expected an OME-Zarr image or a plain array)"
        )
    return node[path]


def zarr_tomogram(
    node: zarr.Array | zarr.Group, where: str, chunk_size: ShapeZYX
) -> tuple[da.Array, tuple[float, float, float], tuple[float, ...]]:
    """(dask array of scale 0, voxel size, origin) of a zarr group or array; `where` names it in errors."""
    array = level0(node, where)
    voxel_size, origin = _ome_scale_translation(node)
    if array.ndim != 3:
        raise InputFileError(f"{where}: array is {array.ndim}D {tuple(array.shape)}; a 3D tomogram is needed")
    chunks = tuple(min(c, s) for c, s in zip(chunk_size, array.shape, strict=True))
    return da.from_zarr(array, chunks=chunks), voxel_size, origin


def _open_zarr_input(path: Path, chunk_size: ShapeZYX) -> tuple[da.Array, Path, tuple, tuple]:
    data, voxel_size, origin = zarr_tomogram(_open_zarr_node(path), str(path), chunk_size)
    return data, path, voxel_size, origin


def open_tomogram(
    path: str | os.PathLike | Any,
    *,
    work_dir: str | os.PathLike,
    chunk_size: ShapeZYX = DEFAULT_CHUNKS,
    file_extension: str | None = None,
) -> Tomogram:
    """Open a tomogram as a chunked dask array, converting MRC/REC to zarr in ``work_dir`` when needed.

    Parameters
    ----------
    path : str or PathLike or reference
        A reference (:class:`~cryosiam_dask.io.remote.ZarrUrl`,
        :class:`~cryosiam_dask.io.copick.CopickTomogram`) is read in place from its OME-Zarr, scale 0.
        ``.mrc`` / ``.rec`` (optionally ``.gz`` / ``.bz2``): converted to ``<work_dir>/<stem>.zarr``,
        reusing an earlier conversion when the recorded source size and mtime_ns still match. ``.zarr``:
        used in place (an OME-Zarr group with array ``"0"``, or a plain 3D array), never copied.
    work_dir : str or PathLike
        Folder for conversions.
    chunk_size : (3,) tuple of int, default (128, 256, 256)
        Dask chunks (z, y, x) of ``Tomogram.data``; also the zarr chunks of a new conversion.
    file_extension : str, optional
        CryoSiam's ``file_extension``; see :func:`stem_of`.

    Returns
    -------
    Tomogram
        ``data`` is (Z, Y, X) in the stored dtype.

    Raises
    ------
    InputFileError
        Missing or invalid input (see :func:`check_tomogram`).

    Examples
    --------
    >>> from cryosiam_dask.testing.synthetic import make_tomogram, write_mrc
    >>> src = write_mrc(tmp / "TS_01.mrc", make_tomogram((32, 48, 48)).tomogram, voxel_size=10.0)
    >>> tomo = open_tomogram(src, work_dir=tmp / "work", chunk_size=(16, 32, 32))
    >>> tomo.data.chunksize, tomo.voxel_size, tomo.stem
    ((16, 32, 32), (10.0, 10.0, 10.0), 'TS_01')
    """
    if not isinstance(path, (str, os.PathLike)):  # a URL or copick reference: read in place, never copied
        data, voxel_size, origin = zarr_tomogram(path.open_node(), path.name, chunk_size)
        return Tomogram(data, voxel_size, origin, path, path.stem, None)
    path = Path(path)
    stem = stem_of(path, file_extension)
    if path.name.lower().endswith(".zarr"):
        if not path.exists():
            raise InputFileError(f"{path}: zarr input not found")
        data, zpath, voxel_size, origin = _open_zarr_input(path, chunk_size)
        return Tomogram(data, voxel_size, origin, path, stem, zpath)
    if not path.name.lower().endswith(TOMOGRAM_SUFFIXES):
        raise InputFileError(
            f"{path}: unsupported tomogram suffix; expected one of {', '.join(TOMOGRAM_SUFFIXES)}, .zarr"
        )
    info = check_tomogram(path)
    zarr_path = Path(work_dir) / f"{stem}.zarr"
    if conversion_is_current(zarr_path, path):
        logger.info("reusing conversion %s of %s", zarr_path, path)
    else:
        tomogram_to_zarr(path, zarr_path, chunk_size=chunk_size)
    data, _, voxel_size, origin = _open_zarr_input(zarr_path, chunk_size)
    if tuple(data.shape) != info.shape:
        raise InputFileError(f"{zarr_path}: conversion is {tuple(data.shape)} but {path} is {info.shape}")
    return Tomogram(data, info.voxel_size, info.origin, path, stem, zarr_path)
