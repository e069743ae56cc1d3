"""Inputs: MRC/REC tomograms streamed into OME-Zarr, zarr inputs used in place, and CryoSiam's lamella masks.

Every array is (z, y, x). Tomograms keep their stored dtype (CryoSiam's clip/normalisation happens later, per
chunk). Voxel sizes and origins are in ångström, in (z, y, x) order.

Conversion layout: ``<work_dir>/<stem>.zarr`` is a zarr v3 group holding OME-Zarr (NGFF 0.5) ``multiscales``
metadata (axes z, y, x of type ``space`` in ``angstrom``, scale = voxel size, translation = header origin)
and one array ``"0"``. Our own attributes (source path, size, mtime_ns, dtype) sit under the
``cryosiam_dask`` key of the group attributes and decide whether an existing conversion can be reused.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import mrcfile
import numpy as np
import zarr

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import InputFileError

__all__ = [
    "MrcInfo",
    "Tomogram",
    "check_tomogram",
    "open_tomogram",
    "stem_of",
    "tomogram_to_zarr",
    "voxel_size_of",
]

logger = logging.getLogger(__name__)

TOMOGRAM_SUFFIXES = (".mrc", ".rec", ".mrc.gz", ".rec.gz", ".mrc.bz2", ".rec.bz2")
"""Suffixes read as MRC (CryoSiam: mrc and rec, optionally gz/bz2; compressed files are loaded whole)."""

SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
"""MRC modes accepted as tomograms (complex modes 3/4 and packed 4-bit mode 101 are not)."""

DEFAULT_CHUNKS: ShapeZYX = (128, 256, 256)
OME_VERSION = "0.5"
_OUR_KEY = "cryosiam_dask"


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
    path : Path
        The input file as given (MRC/REC or zarr).
    stem : str
        Output file stem: the basename without its extension, as CryoSiam names outputs.
    zarr_path : Path
        The zarr group or array that backs ``data``.
    """

    data: da.Array
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    path: Path
    stem: str
    zarr_path: Path


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


def voxel_size_of(path: str | os.PathLike) -> tuple[float, float, float]:
    """Return the voxel size (z, y, x) in Å of an MRC/REC file or of a zarr from :func:`tomogram_to_zarr`.

    A zarr without OME metadata gives (1.0, 1.0, 1.0).
    """
    path = Path(path)
    if path.name.lower().endswith(".zarr"):
        return _ome_scale_translation(_open_zarr_node(path))[0]
    return check_tomogram(path).voxel_size


def _ome_metadata(
    shape: ShapeZYX, voxel_size: tuple[float, ...], origin: tuple[float, ...], name: str
) -> dict:
    scale = [float(v) if v > 0 else 1.0 for v in voxel_size]
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": ax, "type": "space", "unit": "angstrom"} for ax in ("z", "y", "x")],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": scale},
                            {"type": "translation", "translation": [float(o) for o in origin]},
                        ],
                    }
                ],
            }
        ],
    }


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
        group.attrs.update(
            {
                "ome": _ome_metadata(info.shape, info.voxel_size, info.origin, stem_of(src)),
                _OUR_KEY: {
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
    ome = attrs.get("ome", attrs)
    scale, translation = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    try:
        for t in ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]:
            if t["type"] == "scale":
                scale = tuple(float(v) for v in t["scale"][-3:])
            elif t["type"] == "translation":
                translation = tuple(float(v) for v in t["translation"][-3:])
    except (KeyError, IndexError, TypeError):
        ours = attrs.get(_OUR_KEY, {})
        scale = tuple(ours.get("voxel_size", scale))
        translation = tuple(ours.get("origin", translation))
    return scale, translation  # type: ignore[return-value]


def _open_zarr_input(path: Path, chunk_size: ShapeZYX) -> tuple[da.Array, Path, tuple, tuple]:
    node = _open_zarr_node(path)
    array_path = path
    if isinstance(node, zarr.Group):
        if "0" not in node:
            raise InputFileError(
                f"{path}: zarr group has no array '0' (expected an OME-Zarr image or a plain array)"
            )
        array, array_path = node["0"], path / "0"
        voxel_size, origin = _ome_scale_translation(node)
    else:
        array = node
        voxel_size, origin = _ome_scale_translation(node)
    if array.ndim != 3:
        raise InputFileError(f"{path}: array is {array.ndim}D {tuple(array.shape)}; a 3D tomogram is needed")
    data = da.from_zarr(
        str(array_path), chunks=tuple(min(c, s) for c, s in zip(chunk_size, array.shape, strict=True))
    )
    return data, path, voxel_size, origin


def _conversion_is_current(zarr_path: Path, src: Path) -> bool:
    try:
        group = zarr.open_group(zarr_path, mode="r")
        ours = dict(group.attrs).get(_OUR_KEY, {})
        stat = src.stat()
        return (
            "0" in group
            and ours.get("source_size") == stat.st_size
            and ours.get("source_mtime_ns") == stat.st_mtime_ns
        )
    except Exception:  # anything unreadable is simply converted again
        return False


def open_tomogram(
    path: str | os.PathLike,
    *,
    work_dir: str | os.PathLike,
    chunk_size: ShapeZYX = DEFAULT_CHUNKS,
    file_extension: str | None = None,
) -> Tomogram:
    """Open a tomogram as a chunked dask array, converting MRC/REC to zarr in ``work_dir`` when needed.

    Parameters
    ----------
    path : str or PathLike
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
    >>> from cryosiam_dask.synthetic import make_tomogram, write_mrc
    >>> src = write_mrc(tmp / "TS_01.mrc", make_tomogram((32, 48, 48)).tomogram, voxel_size=10.0)
    >>> tomo = open_tomogram(src, work_dir=tmp / "work", chunk_size=(16, 32, 32))
    >>> tomo.data.chunksize, tomo.voxel_size, tomo.stem
    ((16, 32, 32), (10.0, 10.0, 10.0), 'TS_01')
    """
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
    if _conversion_is_current(zarr_path, path):
        logger.info("reusing conversion %s of %s", zarr_path, path)
    else:
        tomogram_to_zarr(path, zarr_path, chunk_size=chunk_size)
    data, _, voxel_size, origin = _open_zarr_input(zarr_path, chunk_size)
    if tuple(data.shape) != info.shape:
        raise InputFileError(f"{zarr_path}: conversion is {tuple(data.shape)} but {path} is {info.shape}")
    return Tomogram(data, info.voxel_size, info.origin, path, stem, zarr_path)



def __getattr__(name: str) -> object:
    """``io.read_mask`` / ``io.resize_mask`` live in :mod:`cryosiam_dask.masks` (imported on first use: masks
    imports this module, so a module-level import here would be circular)."""
    if name in ("read_mask", "resize_mask"):
        from cryosiam_dask import masks

        return getattr(masks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
