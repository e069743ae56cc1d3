"""Lamella masks as CryoSiam writes them, resized to the tomogram exactly as CryoSiam does, lazily per chunk.

CryoSiam reads ``mask_folder/<stem>_preds.h5['labels']`` and, when the shape differs, calls
``skimage.transform.resize(mask, shape, mode='constant', preserve_range=True).astype(int8)`` (linear
interpolation, anti-aliasing when shrinking, then truncation). :func:`resize_mask` computes the same values
block by block.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import mrcfile
import numpy as np

from cryosiam_dask._types import DEFAULT_CHUNKS, ShapeZYX
from cryosiam_dask.errors import InputFileError

logger = logging.getLogger(__name__)


class _MaskFile:
    """A picklable, lazily opened mask (h5 dataset or MRC) read as int8; each ``[...]`` opens the file anew.

    ``dask.array.from_array`` on an open ``h5py.Dataset`` cannot be sent to distributed workers; this can.
    """

    def __init__(self, path: Path, key: str | None, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.key, self.shape, self.source_dtype = path, key, tuple(shape), dtype
        self.dtype = np.dtype(np.int8)
        self.ndim = len(self.shape)

    def __getitem__(self, index: object) -> np.ndarray:
        try:
            return self._read(index)
        except (OSError, ValueError) as e:  # a damaged chunk, a disk error: name the file, not h5py's words
            text = " ".join(str(e).split()) or type(e).__name__
            what = f"{type(e).__name__}: {text}"
            raise InputFileError(f"{self.path}: cannot read the lamella mask ({what})") from e

    def _read(self, index: object) -> np.ndarray:
        if self.key is not None:
            import h5py

            with h5py.File(self.path, "r") as f:
                return np.asarray(f[self.key][index]).astype(np.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.mmap(self.path, mode="r", permissive=True) as mrc:
                return np.asarray(mrc.data[index]).astype(np.int8)


def find_mask(mask_folder: Path, stem: str) -> _MaskFile:
    """The lamella mask file of `stem` in `mask_folder` (header read only); InputFileError names it if bad."""
    import h5py

    h5_path = mask_folder / f"{stem}_preds.h5"
    if h5_path.is_file():
        try:
            with h5py.File(h5_path, "r") as f:
                if "labels" not in f:
                    raise InputFileError(
                        f"{h5_path}: mask file has no dataset 'labels' (found {sorted(f.keys())})"
                    )
                ds = f["labels"]
                return _MaskFile(h5_path, "labels", ds.shape, ds.dtype)
        except OSError as e:
            raise InputFileError(f"{h5_path}: not a readable HDF5 mask ({e})") from e
    for name in (f"{stem}_preds.mrc", f"{stem}.mrc"):
        mrc_path = mask_folder / name
        if mrc_path.is_file():
            try:
                with mrcfile.mmap(mrc_path, mode="r", permissive=True) as mrc:
                    if mrc.data is None:
                        raise ValueError("no data")
                    return _MaskFile(mrc_path, None, mrc.data.shape, mrc.data.dtype)
            except (ValueError, OSError) as e:
                raise InputFileError(f"{mrc_path}: not a readable MRC mask ({e})") from e
    raise InputFileError(
        f"{h5_path}: lamella mask not found (also looked for {stem}_preds.mrc and {stem}.mrc)"
    )


def mask_reader(mask_folder: str | os.PathLike | None, stem: str, shape: ShapeZYX) -> Any:
    """An object whose ``[z0:z1, y0:y1, x0:x1]`` reads (or resizes) that region of the mask, or None.

    A task given it reads its own region: the lamella mask of the tomogram's shape from its file, a mask of
    another shape resized region by region exactly as CryoSiam does (see :func:`read_mask`). Picklable.
    """
    if mask_folder is None or str(mask_folder) == "":
        return None
    source = find_mask(Path(mask_folder), stem)
    shape = tuple(int(s) for s in shape)
    if len(source.shape) != len(shape):
        raise InputFileError(
            f"mask {source.path} is {len(source.shape)}D {source.shape} but tomogram is {len(shape)}D {shape}"
        )
    if source.shape == shape:
        return source
    logger.info("resizing mask %s from %s to %s", source.path, source.shape, shape)
    reader = resized_mask_reader(source[...], shape)
    if isinstance(reader, _ResizedMask):
        reader.path = source.path  # names the dask key (with the file's mtime)
    return reader


def read_mask(
    mask_folder: str | os.PathLike | None, stem: str, shape: ShapeZYX, *, chunks: ShapeZYX = DEFAULT_CHUNKS
) -> da.Array | None:
    """Read CryoSiam's lamella mask for a tomogram, resized to the tomogram's shape exactly as CryoSiam does.

    Parameters
    ----------
    mask_folder : str or PathLike or None
        Folder of ``<stem>_preds.h5`` (dataset ``labels``, as written by CryoSiam's lamella step); if that
        file is absent, ``<stem>_preds.mrc`` or ``<stem>.mrc``. None or ``''``: no mask.
    stem : str
        Tomogram stem.
    shape : (3,) tuple of int
        Tomogram shape (z, y, x).
    chunks : (3,) tuple of int, default (128, 256, 256)
        Chunks of the returned array.

    Returns
    -------
    (Z, Y, X) dask.array.Array of int8, or None
        Mask factors (the pipeline multiplies by them; they are not binarised), read lazily chunk by chunk
        (:func:`mask_reader`). A mask of another 3D shape is resized block by block with the arithmetic of
        ``skimage.transform.resize(mask, shape, mode='constant', preserve_range=True).astype(np.int8)``
        (linear interpolation, Gaussian anti-aliasing when an axis shrinks, truncation), bit for bit; the
        (small) source mask is held in memory as float64 for that.

    Raises
    ------
    InputFileError
        Missing mask file or dataset, or a mask that is not 3D.
    """
    reader = mask_reader(mask_folder, stem, shape)
    return None if reader is None else mask_array(reader, stem, chunks=chunks)


def mask_array(reader: Any, stem: str, *, chunks: ShapeZYX = DEFAULT_CHUNKS) -> da.Array:
    """The (Z, Y, X) int8 dask array of a :func:`mask_reader`, chunk by chunk."""
    shape = tuple(int(s) for s in reader.shape)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    name = f"read-mask-{_dask_token(getattr(reader, 'path', stem), shape, chunks, type(reader).__name__)}"
    return da.from_array(reader, chunks=chunks, meta=np.empty((0, 0, 0), np.int8), name=name, asarray=True)


def _dask_token(*args: object) -> str:
    """Deterministic dask name token of the arguments (plus the file's mtime when the first is a path)."""
    from dask.base import tokenize

    extra = Path(args[0]).stat().st_mtime_ns if args and isinstance(args[0], Path) else None
    return tokenize(*[str(a) for a in args], extra)


def _resize_setup(mask: np.ndarray, shape: ShapeZYX) -> tuple[np.ndarray, np.ndarray, float, float]:
    """skimage.transform.resize's steps before the zoom: float64 cast, anti-aliasing, zoom, clip range."""
    from scipy import ndimage as ndi

    image = mask.astype(np.float64) if mask.dtype.char not in "df" else mask
    factors = np.divide(mask.shape, shape)
    if any(
        o < i for o, i in zip(shape, mask.shape, strict=True)
    ):  # skimage's default anti_aliasing for order 1
        sigma = np.maximum(0, (factors - 1) / 2)
        filtered = ndi.gaussian_filter(image, sigma, cval=0.0, mode="grid-constant")
    else:
        filtered = image
    # scipy.ndimage.zoom: output shape from the zoom factors, then zoom = in / out (grid_mode=True).
    zoom_factors = [1 / f for f in factors]
    out_shape = tuple(int(round(i * z)) for i, z in zip(mask.shape, zoom_factors, strict=True))
    if out_shape != tuple(shape):
        raise InputFileError(
            f"mask of shape {mask.shape} cannot be resized to {shape} (zoom gives {out_shape})"
        )
    zoom = np.ascontiguousarray(np.divide(np.array(mask.shape), np.array(out_shape), dtype=np.float64))
    return np.ascontiguousarray(filtered), zoom, float(np.min(image)), float(np.max(image))


class _ResizedMask:
    """A mask resized to `shape` region by region: scipy's zoom kernel shifted to the region's offset."""

    def __init__(self, filtered: np.ndarray, zoom: np.ndarray, lo: float, hi: float, shape: ShapeZYX) -> None:
        self.filtered, self.zoom, self.lo, self.hi = filtered, zoom, lo, hi
        self.shape, self.ndim, self.dtype = tuple(shape), 3, np.dtype(np.int8)
        self.path: Path | None = None

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        """The region's values, identical to the whole resize.

        ``zoom_shift`` computes the input coordinate ``((k + shift) + 0.5) * zoom - 0.5`` for output
        index ``k``; with ``shift`` the region's offset this is exactly the whole-array coordinate.
        """
        from scipy.ndimage import _nd_image, _ni_support

        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape, strict=True)]
        offset = np.array([a for a, _ in bounds], dtype=np.float64)
        out = np.empty([max(0, b - a) for a, b in bounds], dtype=np.float64)
        mode = _ni_support._extend_mode_to_code("grid-constant")
        _nd_image.zoom_shift(self.filtered, self.zoom, offset, out, 1, mode, 0.0, 0, True)
        np.clip(out, self.lo, self.hi, out=out)
        return out.astype(np.int8)


def resized_mask_reader(mask: np.ndarray, shape: ShapeZYX) -> Any:
    """CryoSiam's ``resize(mask, shape, mode='constant', preserve_range=True).astype(np.int8)``, readable by
    region (see :func:`resize_mask`)."""
    filtered, zoom, lo, hi = _resize_setup(mask, shape)
    if not lo <= 0.0 <= hi:
        from skimage.transform import resize

        return resize(mask, shape, mode="constant", preserve_range=True).astype(np.int8)
    return _ResizedMask(filtered, zoom, lo, hi, tuple(int(s) for s in shape))


def resize_mask(mask: np.ndarray, shape: ShapeZYX, *, chunks: ShapeZYX = DEFAULT_CHUNKS) -> da.Array:
    """Lazily resize a mask like CryoSiam: ``resize(mask, shape, mode='constant', preserve_range=True)``.

    Parameters
    ----------
    mask : (z, y, x) ndarray
        Source mask (any real dtype; CryoSiam passes int8).
    shape : (3,) tuple of int
        Target shape (Z, Y, X).
    chunks : (3,) tuple of int
        Output chunks.

    Returns
    -------
    (Z, Y, X) dask.array.Array of int8
        ``astype(np.int8)`` of the resized values (truncation: only exact 1.0 stays 1 for a 0/1 mask).

    Notes
    -----
    Each region calls scipy's zoom kernel over the whole (anti-aliased, float64) source mask with the region's
    offset as a shift, so regions equal the whole-array result bit for bit. skimage widens its clip range to
    include 0 when 0 lies outside the input's range and the output reaches 0, which depends on the whole
    output; for such masks (no 0 and no negative values) the resize is computed in memory with skimage itself.
    """
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    reader = resized_mask_reader(mask, shape)
    return da.from_array(reader, chunks=chunks, meta=np.empty((0, 0, 0), np.int8), asarray=True)
