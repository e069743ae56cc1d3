"""Seeded watershed of one block: skimage's on numpy, an array-operations flood on cupy."""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosiam_dask.backend import get_xp, is_cupy

__all__ = ["flood_watershed", "seeded_watershed"]


def _shift(a: Any, axis: int, step: int, fill: Any) -> Any:
    """Return b with b[i] = a[i - step] along `axis` (fill where that is outside)."""
    xp = get_xp(a)
    out = xp.full_like(a, fill)
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    if step > 0:
        src[axis], dst[axis] = slice(0, -step), slice(step, None)
    else:
        src[axis], dst[axis] = slice(-step, None), slice(0, step)
    out[tuple(dst)] = a[tuple(src)]
    return out


def flood_watershed(image: Any, markers: Any, mask: Any) -> Any:
    """Seeded watershed written with array operations only (numpy or cupy, unchanged).

    Every mask voxel takes the marker of the 6-neighbour through which the flood reaches it first. The
    flood time of a voxel is its minimax cost ``c``: the lowest possible maximum of `image` along a
    6-connected path inside the mask from a marker voxel to it, both ends included (skimage queues marker
    voxels at their own value). A voxel's label is the label of its neighbour of lowest ``c``; among
    neighbours of equal ``c`` (a basin flooded through one pass voxel) the one fewest steps from the voxel
    where that cost was set. Costs, steps and labels are found by relaxing
    ``c(p) = max(image[p], min_q c(q))`` over the six neighbours until nothing changes: a flood "by sorted
    level" done as repeated whole-array passes (at most the longest flooding path in passes, each a handful
    of ``xp.where``/``xp.minimum`` calls), so it runs unchanged on the GPU. This gives skimage's partition
    when `image` has no ties; on ties skimage goes first-in-first-out, which this does not reproduce.

    Parameters
    ----------
    image : (Z, Y, X) ndarray of float
    markers : (Z, Y, X) ndarray of int
        Seeds (0 = none); seeds outside `mask` are dropped.
    mask : (Z, Y, X) ndarray of bool

    Returns
    -------
    (Z, Y, X) ndarray of int64, the same array type as `image`
        0 outside the mask and where no marker can reach.
    """
    xp = get_xp(image)
    image = image.astype(xp.float64)
    seeds = (markers > 0) & mask
    labels = xp.where(seeds, markers, 0).astype(xp.int64)
    cost = xp.where(seeds, image, xp.inf)
    hops = xp.zeros(image.shape, dtype=xp.int64)
    free = mask & ~seeds
    far = xp.iinfo(xp.int64).max
    neighbours = [(axis, step) for axis in range(image.ndim) for step in (1, -1)]
    while True:
        best = xp.full_like(cost, xp.inf)
        best_hops = xp.full_like(hops, far)
        best_label = xp.zeros_like(labels)
        for axis, step in neighbours:
            c, h = _shift(cost, axis, step, xp.inf), _shift(hops, axis, step, far)
            better = (c < best) | ((c == best) & (h < best_hops))
            best = xp.where(better, c, best)
            best_hops = xp.where(better, h, best_hops)
            best_label = xp.where(better, _shift(labels, axis, step, 0), best_label)
        reached = free & (best < xp.inf)
        new_cost = xp.where(free, xp.maximum(image, best), cost)
        new_hops = xp.where(reached, xp.where(image >= best, 0, best_hops + 1), hops)
        new_labels = xp.where(reached, best_label, labels)
        same = xp.array_equal(new_cost, cost) & xp.array_equal(new_hops, hops)
        if bool(same & xp.array_equal(new_labels, labels)):
            return new_labels
        cost, hops, labels = new_cost, new_hops, new_labels


def seeded_watershed(image: Any, markers: Any, mask: Any) -> Any:
    """Watershed of `image` from `markers` inside `mask`, 6-connected (CryoSiam's step 7).

    Parameters
    ----------
    image : (Z, Y, X) numpy.ndarray or cupy.ndarray of float
        Relief to flood (CryoSiam: ``-distance`` as float64).
    markers : (Z, Y, X) ndarray of int
        Seeds, 0 = none. Their ids are kept in the output.
    mask : (Z, Y, X) ndarray of bool

    Returns
    -------
    (Z, Y, X) ndarray of int64, the same array type as `image`
        On numpy: ``skimage.segmentation.watershed(image, markers, mask=mask, connectivity=1)``, exactly as
        the original. On cupy (no cuCIM watershed exists): `flood_watershed`, an iterative minimax
        relaxation with array operations only, run on the GPU (no host round trip); same partition as
        skimage's where `image` has no ties.
    """
    if is_cupy(image):
        return flood_watershed(image, markers, mask)
    from skimage.segmentation import watershed

    return watershed(np.asarray(image, dtype=np.float64), markers, mask=mask, connectivity=1).astype(np.int64)
