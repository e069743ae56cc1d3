"""Seeded watershed of one block: skimage's, on the host, for numpy and cupy blocks alike.

cuCIM has no watershed. `flood_watershed` is an array-operations flood that runs on the GPU, but it is not
CryoSiam's partition where the relief has ties (measured: identical on the six golden settings and the demo,
yet different on 86 of 100 random three-level reliefs of 8x12x12, which also need more passes than the
bound), and ties are common here (the EDT clipped at 5, then blurred, makes plateaus). So a cupy block is
flooded by skimage on the host (three copies of one window; the rest of the instance stage stays on the
device), and the flood is kept only to be measured against it (``method="flood"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosiam_dask.backend import get_xp, to_numpy

__all__ = ["FloodNotConverged", "flood_watershed", "seeded_watershed"]


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


class FloodNotConverged(RuntimeError):
    """`flood_watershed` did not settle within its pass bound (it can oscillate on ties)."""


def flood_watershed(image: Any, markers: Any, mask: Any, max_passes: int | None = None) -> Any:
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
    when `image` has no ties; on ties skimage goes first-in-first-out, which this does not reproduce, and
    the relaxation may oscillate: it stops after `max_passes`.

    Parameters
    ----------
    image : (Z, Y, X) ndarray of float
    markers : (Z, Y, X) ndarray of int
        Seeds (0 = none); seeds outside `mask` are dropped.
    mask : (Z, Y, X) ndarray of bool
    max_passes : int or None, default None
        Bound on the passes; None = the number of mask voxels + 1 (no flooding path is longer).

    Returns
    -------
    (Z, Y, X) ndarray of int64, the same array type as `image`
        0 outside the mask and where no marker can reach.

    Raises
    ------
    FloodNotConverged
        Nothing settled within `max_passes`.
    """
    xp = get_xp(image)
    if max_passes is None:
        max_passes = int(mask.sum()) + 1
    image = image.astype(xp.float64)
    seeds = (markers > 0) & mask
    labels = xp.where(seeds, markers, 0).astype(xp.int64)
    cost = xp.where(seeds, image, xp.inf)
    hops = xp.zeros(image.shape, dtype=xp.int64)
    free = mask & ~seeds
    far = xp.iinfo(xp.int64).max
    neighbours = [(axis, step) for axis in range(image.ndim) for step in (1, -1)]
    for _ in range(max_passes):
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
    raise FloodNotConverged(f"flood_watershed did not settle in {max_passes} passes")


def seeded_watershed(image: Any, markers: Any, mask: Any, *, method: str = "skimage") -> Any:
    """Watershed of `image` from `markers` inside `mask`, 6-connected (CryoSiam's step 7).

    Parameters
    ----------
    image : (Z, Y, X) numpy.ndarray or cupy.ndarray of float
        Relief to flood (CryoSiam: ``-distance`` as float64).
    markers : (Z, Y, X) ndarray of int
        Seeds, 0 = none. Their ids are kept in the output.
    mask : (Z, Y, X) ndarray of bool
    method : {"skimage", "flood"}, default "skimage"
        ``skimage``: ``skimage.segmentation.watershed(image, markers, mask=mask, connectivity=1)``, exactly
        as the original; cupy inputs are copied to the host for it and the labels back to the device.
        ``flood``: :func:`flood_watershed` on the inputs' own device (not CryoSiam's partition on ties; for
        measurement only).

    Returns
    -------
    (Z, Y, X) ndarray of int64, the same array type as `image`
    """
    if method == "flood":
        return flood_watershed(image, markers, mask)
    if method != "skimage":
        raise ValueError(f"seeded_watershed: method must be 'skimage' or 'flood', got {method!r}")
    from skimage.segmentation import watershed

    labels = watershed(
        to_numpy(image).astype(np.float64, copy=False), to_numpy(markers), mask=to_numpy(mask), connectivity=1
    ).astype(np.int64)
    return get_xp(image).asarray(labels)
