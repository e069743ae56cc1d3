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
        Mask factors (the pipeline multiplies by them; they are not binarised). A mask of the tomogram's
        shape is read lazily, chunk by chunk. A mask of another 3D shape is resized block by block with the
        arithmetic of
        ``skimage.transform.resize(mask, shape, mode='constant', preserve_range=True).astype(np.int8)``
        (linear interpolation, Gaussian anti-aliasing when an axis shrinks, truncation), bit for bit; the
        (small) source mask is held in memory as float64 for that.

    Raises
    ------
    InputFileError
        Missing mask file or dataset, or a mask that is not 3D.
    """
    if mask_folder is None or str(mask_folder) == "":
        return None
    source = find_mask(Path(mask_folder), stem)
    shape = tuple(int(s) for s in shape)
    if len(source.shape) != len(shape):
        raise InputFileError(
            f"mask {source.path} is {len(source.shape)}D {source.shape} but tomogram is {len(shape)}D {shape}"
        )
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    meta = np.empty((0, 0, 0), dtype=np.int8)
    name = f"read-mask-{_dask_token(source.path, source.shape, chunks)}"
    if source.shape == shape:
        return da.from_array(source, chunks=chunks, meta=meta, name=name, asarray=True)
    logger.info("resizing mask %s from %s to %s", source.path, source.shape, shape)
    return resize_mask(source[...], shape, chunks=chunks)


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


def _resize_block(
    block: np.ndarray,
    filtered: np.ndarray,
    zoom: np.ndarray,
    lo: float,
    hi: float,
    block_info: dict | None = None,
) -> np.ndarray:
    """One output block of the resize: scipy's zoom kernel shifted to the block's global offset, clip, int8.

    ``zoom_shift`` computes the input coordinate ``((k + shift) + 0.5) * zoom - 0.5`` for output index ``k``;
    with ``shift`` the block's integer offset this is exactly the whole-array coordinate, so the values are
    identical.
    """
    from scipy.ndimage import _nd_image, _ni_support

    offset = np.array([loc[0] for loc in block_info[0]["array-location"]], dtype=np.float64)
    out = np.empty(block.shape, dtype=np.float64)
    mode = _ni_support._extend_mode_to_code("grid-constant")
    _nd_image.zoom_shift(filtered, zoom, offset, out, 1, mode, 0.0, 0, True)
    np.clip(out, lo, hi, out=out)
    return out.astype(np.int8)


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
    Each block calls scipy's zoom kernel over the whole (anti-aliased, float64) source mask with the block's
    offset as a shift, so blocks equal the whole-array result bit for bit; the source mask (a few MB for a
    binned lamella mask) is one graph key shared by all blocks. skimage widens its clip range to include 0
    when 0 lies outside the input's range and the output reaches 0, which depends on the whole output; for
    such masks (no 0 and no negative values) the resize is computed in memory with skimage itself.
    """
    filtered, zoom, lo, hi = _resize_setup(mask, shape)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape, strict=True))
    if not lo <= 0.0 <= hi:
        from skimage.transform import resize

        whole = resize(mask, shape, mode="constant", preserve_range=True).astype(np.int8)
        return da.from_array(whole, chunks=chunks)
    import dask

    shared = dask.delayed(filtered, pure=True)
    template = da.zeros(shape, chunks=chunks, dtype=np.int8)
    return template.map_blocks(
        _resize_block,
        filtered=shared,
        zoom=zoom,
        lo=lo,
        hi=hi,
        dtype=np.int8,
        meta=np.empty((0, 0, 0), np.int8),
    )
