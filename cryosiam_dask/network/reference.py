"""The original's in-memory tiling of a whole volume: the reference for ``exact``, the benchmark baseline."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import ParameterError
from cryosiam_dask.network.tiling import kept_ranges

__all__ = ["predict_whole", "run_original"]


def run_original(model: Any, batch: np.ndarray, amp: str | None = None) -> np.ndarray:
    """The original network's forward on a batch of windows, as CryoSiam runs it: the whole window.

    Parameters
    ----------
    model : torch.nn.Module
        ``forward(x[B, 1, D, H, W]) -> (foreground, distance, boundary)``, each ``[B, 1, D, H, W]``
        (:func:`~cryosiam_dask.network.model.build_model`'s network).
    batch : (B, D, H, W) ndarray of float32
    amp : {None, "bf16", "fp16"}, default None

    Returns
    -------
    (B, 3, D, H, W) ndarray of float32
    """
    import torch

    from cryosiam_dask.network.prepared import AMP_DTYPES

    device = next(iter(model.parameters())).device
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)[:, None]).to(device)
    with torch.inference_mode():
        if amp is None:
            maps = model(x)
        else:
            with torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp]):
                maps = model(x)
        return torch.cat([m.float() for m in maps], dim=1).cpu().numpy()


def predict_whole(
    volume: np.ndarray, model: Any, *, patch_size: ShapeZYX, batch_size: int, amp: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CryoSiam's in-memory tiling of a whole normalised volume (the reference and the benchmark baseline).

    SpatialPad with zeros at the far end of dims smaller than the patch; patch starts every p/2 (all of
    them evaluated, row-major, z outermost, in batches of `batch_size`); reads past the far end wrap around;
    the four stitching rules of :func:`kept_ranges`, later writes winning; crop to the input shape.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Normalised tomogram (see :func:`normalize_block`).
    model : torch.nn.Module
        The original network (see :func:`run_original`).
    patch_size : (pz, py, px) ints, multiples of 4
    batch_size : int

    Returns
    -------
    foreground, distance, boundary : (Z, Y, X) ndarray of float32
    """
    if volume.ndim != 3 or len(patch_size) != 3 or any(p % 4 for p in patch_size):
        raise ParameterError("volume", f"must be 3-D with a patch size of multiples of 4, got volume "
                             f"{volume.shape} and patch_size {tuple(patch_size)}")
    shape = volume.shape
    size = tuple(max(n, p) for n, p in zip(shape, patch_size, strict=True))
    vol = np.pad(np.asarray(volume, np.float32), [(0, s - n) for s, n in zip(size, shape, strict=True)])
    vol = np.pad(vol, [(0, p) for p in patch_size], mode="wrap")
    out = np.zeros((3, *size), np.float32)
    starts = [range(0, s, int(round(0.5 * p))) for s, p in zip(size, patch_size, strict=True)]
    keep = [{c0: (lo, hi) for c0, lo, hi in kept_ranges(s, p)} for s, p in zip(size, patch_size, strict=True)]
    patches = list(itertools.product(*starts))
    for i in range(0, len(patches), batch_size):
        batch = patches[i:i + batch_size]
        inputs = np.stack([vol[tuple(slice(c, c + p) for c, p in zip(c0, patch_size, strict=True))]
                           for c0 in batch])
        preds = run_original(model, inputs, amp=amp)
        for c0, pred in zip(batch, preds, strict=True):
            if any(c not in k for c, k in zip(c0, keep, strict=True)):
                continue
            ranges = [k[c] for c, k in zip(c0, keep, strict=True)]
            dst = tuple(slice(lo, hi) for lo, hi in ranges)
            src = tuple(slice(lo - c, hi - c) for (lo, hi), c in zip(ranges, c0, strict=True))
            out[(slice(None), *dst)] = pred[(slice(None), *src)]
    crop = (slice(None), *(slice(0, n) for n in shape))
    fg, dist, bnd = out[crop]
    return fg, dist, bnd
