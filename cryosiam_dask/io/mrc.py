"""MRC/REC tomograms: the header checked against the file size without reading the data, and the stem."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import InputFileError

__all__ = ["SUPPORTED_MODES", "TOMOGRAM_SUFFIXES", "MrcInfo", "check_tomogram", "stem_of"]

logger = logging.getLogger(__name__)

TOMOGRAM_SUFFIXES = (".mrc", ".rec", ".mrc.gz", ".rec.gz", ".mrc.bz2", ".rec.bz2")
"""Suffixes read as MRC (CryoSiam: mrc and rec, optionally gz/bz2; compressed files are loaded whole)."""

SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
"""MRC modes accepted as tomograms (complex modes 3/4 and packed 4-bit mode 101 are not)."""


@dataclass(frozen=True)
class MrcInfo:
    """What an MRC header says, checked against the file size, without reading the data.

    Attributes
    ----------
    path : Path
    shape : (3,) tuple of int
        (nz, ny, nx).
    dtype : numpy.dtype
        Stored dtype, native byte order.
    voxel_size : (3,) tuple of float
        (z, y, x) in Å, as in the header (0 when unset).
    origin : (3,) tuple of float
        (z, y, x) header origin in Å.
    mode : int
        MRC mode.
    compressed : bool
        True for .gz/.bz2 files (they cannot be memory-mapped and are read whole).
    """

    path: Path
    shape: ShapeZYX
    dtype: np.dtype
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    mode: int
    compressed: bool


def _is_compressed(path: Path) -> bool:
    return path.name.lower().endswith((".gz", ".bz2"))


def stem_of(path: str | os.PathLike, file_extension: str | None = None) -> str:
    """Return CryoSiam's output stem of an input file.

    Parameters
    ----------
    path : str or PathLike
        Input tomogram.
    file_extension : str, optional
        CryoSiam's ``file_extension`` setting; the stem is ``basename.split(file_extension)[0]`` as in the
        original. Default None: strip a known suffix (``.mrc``, ``.rec``, their ``.gz``/``.bz2`` forms,
        ``.zarr``).
    """
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    if file_extension:
        return name.split(file_extension)[0]
    lower = name.lower()
    for suffix in (*TOMOGRAM_SUFFIXES, ".zarr"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def check_tomogram(path: str | os.PathLike) -> MrcInfo:
    """Validate an MRC/REC tomogram from its header and file size, without reading the data.

    Parameters
    ----------
    path : str or PathLike
        ``.mrc`` / ``.rec`` file (``.gz`` / ``.bz2`` accepted).

    Returns
    -------
    MrcInfo
        Shape (z, y, x), stored dtype, voxel size and origin (z, y, x, Å).

    Raises
    ------
    InputFileError
        Missing file, not an MRC file, truncated data, a 2D image or an unsupported mode.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: tomogram file not found")
    compressed = _is_compressed(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
                nsymbt = int(mrc.header.nsymbt)
                vs = mrc.voxel_size.copy()
    except Exception as e:  # mrcfile raises ValueError/EOFError/OSError for garbage
        raise InputFileError(f"{path}: not a valid MRC file ({type(e).__name__}: {e})") from e
    for w in caught:
        logger.debug("%s: mrcfile: %s", path, w.message)
    if header is None or bytes(header.map).strip() != b"MAP":
        found = bytes(header.map) if header is not None else b""
        raise InputFileError(f"{path}: not a valid MRC file (map id {found!r}, expected b'MAP ')")
    mode = int(header.mode)
    if mode not in SUPPORTED_MODES:
        raise InputFileError(
            f"{path}: unsupported MRC mode {mode}; supported modes: "
            + ", ".join(f"{m} ({d})" for m, d in SUPPORTED_MODES.items())
        )
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputFileError(f"{path}: not a valid MRC file (dimensions nx={nx}, ny={ny}, nz={nz})")
    if nz == 1:
        raise InputFileError(f"{path}: 2D image {(nz, ny, nx)}; a 3D tomogram is needed")
    dtype = mrcfile.utils.data_dtype_from_header(header).newbyteorder("=")
    if not compressed:
        expected = 1024 + nsymbt + nx * ny * nz * dtype.itemsize
        size = path.stat().st_size
        if size < expected:
            raise InputFileError(
                f"{path}: truncated MRC file ({size} bytes; header {(nz, ny, nx)} {dtype} needs {expected})"
            )
    voxel_size = (float(vs.z), float(vs.y), float(vs.x))
    origin = (float(header.origin.z), float(header.origin.y), float(header.origin.x))
    return MrcInfo(path, (nz, ny, nx), np.dtype(dtype), voxel_size, origin, mode, compressed)
