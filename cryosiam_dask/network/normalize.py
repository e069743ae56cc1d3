"""CryoSiam's intensity scaling and normalisation, per block (numpy or cupy), and the volume statistics."""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.backend import get_xp

__all__ = ["normalize_block", "volume_stats"]


def normalize_block(x: Any, *, a_min: float, a_max: float, mean: float, std: float) -> Any:
    """Scale and normalise intensities exactly as CryoSiam's MONAI transforms, in float32.

    ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)`` then ``NormalizeIntensity(mean, std)``:
    ``(x - a_min) / (a_max - a_min)``, clipped to [0, 1], then ``(x - mean) / std``, each step in float32.
    With ``a_max == a_min`` only ``x - a_min`` is taken (no division, no clip); a ``std`` of 0 counts as 1.

    Parameters
    ----------
    x : (Z, Y, X) numpy or cupy array, any real dtype
        One block of the tomogram (not modified).
    a_min, a_max, mean, std : float
        ``parameters.data.min/max/mean/std`` of the config (use :func:`volume_stats` for null mean/std).

    Returns
    -------
    (Z, Y, X) array of float32, same array type as ``x``.
    """
    xp = get_xp(x)
    f32 = xp.float32
    y = xp.asarray(x).astype(f32, copy=True)
    y -= f32(a_min)
    if a_max - a_min != 0.0:
        y /= f32(a_max - a_min)
        xp.clip(y, f32(0), f32(1), out=y)
    y -= f32(mean)
    y /= f32(1.0 if std == 0 else std)
    return y


def volume_stats(tomogram: da.Array, *, a_min: float = 0.0, a_max: float = 1.0) -> tuple[float, float]:
    """Mean and population std of the scaled float32 volume (CryoSiam's values for a null mean/std).

    Parameters
    ----------
    tomogram : (Z, Y, X) dask.array.Array
        The raw tomogram.
    a_min, a_max : float, default 0.0 and 1.0
        Intensity range of the scaling step (see :func:`normalize_block`).

    Returns
    -------
    mean, std : float
        Computed with one dask reduction (float64 accumulation of the float32 scaled values).
    """
    scaled = tomogram.map_blocks(
        normalize_block, a_min=a_min, a_max=a_max, mean=0.0, std=1.0, dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )
    mean, std = dask.compute(scaled.mean(dtype=np.float64), scaled.std(dtype=np.float64))
    return float(mean), float(std)
