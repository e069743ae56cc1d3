"""ITK's ``BilateralImageFilter`` as CryoSiam's multicut calls it, bit for bit, on numpy or cupy blocks.

ITK 5.4.0's recipe (spacing 1): a Gaussian domain kernel of radius ``ceil(2.5 * domain_sigma)`` per
axis, normalised to sum 1; range weights from a 100-entry table of the Gaussian at steps of
``4 * range_sigma / 100``, looked up at ``floor(|neighbour - centre| / step)``; neighbours at or beyond
``4 * range_sigma`` left out;
out-of-volume neighbours replicate the edge voxel; the weighted sum divided by the sum of the weights, in
float64, rounded to float32. Reproduces ``tests/fixtures/cryosiam_golden/postprocessing/
bilateral_boundaries.h5`` exactly. All arrays are (z, y, x).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cryosiam_dask.backend import get_xp

__all__ = ["bilateral_filter", "bilateral_filter_valid", "bilateral_reach"]

# ITK BilateralImageFilter constants (ITK 5.4.0, itkBilateralImageFilter.h).
_DOMAIN_MU = 2.5  # kernel radius = ceil(DomainMu * DomainSigma / spacing)
_RANGE_MU = 4.0  # range cutoff = RangeMu * RangeSigma
_RANGE_SAMPLES = 100  # NumberOfRangeGaussianSamples


def bilateral_reach(domain_sigma: float = 1.0) -> int:
    """Radius (per axis) of ITK's bilateral domain kernel: ``ceil(2.5 * domain_sigma)``.

    Parameters
    ----------
    domain_sigma : float
        Domain (spatial) Gaussian sigma in voxels (spacing 1).

    Returns
    -------
    int
        The kernel radius, i.e. the halo depth a block needs (3 for ``domain_sigma=1``).
    """
    return math.ceil(_DOMAIN_MU * float(domain_sigma))


def _domain_kernel(domain_sigma: float, ndim: int = 3) -> np.ndarray:
    """ITK's normalised Gaussian domain kernel, float64, shape ``(2r+1,) * ndim``.

    Mirrors ``GaussianImageSource`` (Scale 1, Normalized, mean at the kernel centre) followed by the
    division by the kernel's sum done in ``BilateralImageFilter::BeforeThreadedGenerateData``.
    """
    r = bilateral_reach(domain_sigma)
    sigma = float(domain_sigma)
    grids = np.meshgrid(*([np.arange(-r, r + 1, dtype=np.float64)] * ndim), indexing="ij")
    suffix = np.zeros(grids[0].shape, dtype=np.float64)
    for g in grids:
        suffix = suffix + (g * g) / (2.0 * sigma * sigma)
    # GaussianSpatialFunction: scale * (1 / ((sqrt(2 pi))^d * prod(sigma))) * exp(-suffix)
    prefix = 1.0 / (math.pow(math.sqrt(2.0 * math.pi), ndim) * sigma**ndim)
    gauss = prefix * np.exp(-suffix)
    norm = 0.0
    for val in gauss.ravel():  # ITK sums in raster order (x fastest = last numpy axis)
        norm += float(val)
    return gauss / norm


def _range_table(range_sigma: float) -> tuple[np.ndarray, float]:
    """ITK's range Gaussian lookup table (float64, 100 entries) and the distance-to-index factor."""
    range_sigma = float(range_sigma)
    dynamic_range_used = _RANGE_MU * range_sigma
    table_delta = dynamic_range_used / float(_RANGE_SAMPLES)
    range_variance = range_sigma * range_sigma
    denom = range_sigma * math.sqrt(2.0 * math.pi)
    table = np.empty(_RANGE_SAMPLES, dtype=np.float64)
    v = 0.0
    for i in range(_RANGE_SAMPLES):  # ITK accumulates v += delta (not i * delta)
        table[i] = math.exp(-0.5 * v * v / range_variance) / denom
        v += table_delta
    return table, float(_RANGE_SAMPLES) / dynamic_range_used


def bilateral_filter_valid(padded: Any, *, domain_sigma: float = 1.0, range_sigma: float = 0.1) -> Any:
    """ITK's bilateral filter of the core of a block that already carries a halo.

    Parameters
    ----------
    padded : ndarray, shape (Z + 2r, Y + 2r, X + 2r), float32 (any real dtype)
        Block in (z, y, x) order padded on every side with a halo of ``r = bilateral_reach(domain_sigma)``
        voxels (neighbouring data inside the volume, edge replication at the true volume borders).
        numpy or cupy.
    domain_sigma : float
        Spatial Gaussian sigma (voxels).
    range_sigma : float
        Intensity Gaussian sigma.

    Returns
    -------
    ndarray, shape (Z, Y, X), float32
        The filtered core (same array module as the input). Equals the core of the whole-volume
        :func:`bilateral_filter` result bit for bit.
    """
    xp = get_xp(padded)
    r = bilateral_reach(domain_sigma)
    ndim = padded.ndim
    core_shape = tuple(int(s) - 2 * r for s in padded.shape)
    if any(s <= 0 for s in core_shape):
        raise ValueError(f"padded block {padded.shape} is too small for a halo of {r}")
    kernel = _domain_kernel(domain_sigma, ndim).ravel()
    table_np, to_index = _range_table(range_sigma)
    # entry _RANGE_SAMPLES is 0: neighbours at or beyond the cutoff get weight 0 (ITK skips them;
    # adding 0 * pixel and 0 leaves both sums unchanged, so the result is the same bit for bit)
    table_ext = np.append(table_np, 0.0)
    weights = xp.asarray(kernel[:, None] * table_ext[None, :])  # (n_offsets, 101): kernel[k] * table[i]
    src = padded.astype(xp.float64)
    core = tuple(slice(r, r + s) for s in core_shape)
    centre = src[core]
    val = xp.zeros(core_shape, dtype=xp.float64)
    norm = xp.zeros(core_shape, dtype=xp.float64)
    offsets = np.stack(np.meshgrid(*([np.arange(2 * r + 1)] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    for k, off in enumerate(offsets):  # raster order of ITK's neighbourhood (last axis fastest)
        nb = src[tuple(slice(int(o), int(o) + s) for o, s in zip(off, core_shape, strict=True))]
        # ITK: index = int(|pixel - centre| * (100 / (4 range_sigma))), truncation == floor here
        idx = xp.minimum(xp.abs(nb - centre) * to_index, float(_RANGE_SAMPLES)).astype(xp.int32)
        w = xp.take(weights[k], idx)  # == kernel[k] * table[idx], ITK's gaussianProduct
        val += nb * w
        norm += w
    return (val / norm).astype(xp.float32)


def bilateral_filter(image: Any, *, domain_sigma: float = 1.0, range_sigma: float = 0.1) -> Any:
    """ITK ``BilateralImageFilter`` (ITK 5.4.0, spacing 1), reproduced bit for bit.

    Domain kernel: Gaussian of radius ``ceil(2.5 * domain_sigma)`` per axis, normalised to sum 1. Range
    weights: a 100-entry table of ``exp(-v^2 / (2 range_sigma^2)) / (range_sigma sqrt(2 pi))`` at
    ``v = 0, d, 2d, ...`` with ``d = 4 range_sigma / 100``, looked up at ``floor(|neighbour - centre| / d)``;
    neighbours with index >= 100 are left out. Out-of-volume neighbours replicate the edge voxel
    (zero-flux Neumann). float64 accumulation in ITK's neighbourhood order, float32 result.

    The result at a voxel depends only on the voxels within ``bilateral_reach(domain_sigma)`` of it, so
    ``dask.array.map_overlap(bilateral_filter, depth=bilateral_reach(), boundary='nearest')`` gives the
    whole-volume result (edge padding of a halo-padded block does not reach its core).

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X), float32 (any real dtype)
        Boundary probability map in (z, y, x) order; numpy or cupy.
    domain_sigma : float
        Spatial Gaussian sigma (voxels).
    range_sigma : float
        Intensity Gaussian sigma.

    Returns
    -------
    ndarray, shape (Z, Y, X), float32
        The filtered map, same array module as ``image``.
    """
    xp = get_xp(image)
    r = bilateral_reach(domain_sigma)
    padded = xp.pad(image, r, mode="edge")
    return bilateral_filter_valid(padded, domain_sigma=domain_sigma, range_sigma=range_sigma)
