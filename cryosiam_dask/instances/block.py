"""CryoSiam's post-processing of one in-memory block: smoothing, the EDT term, markers, the watershed.

These functions take numpy or cupy arrays and pick the array module from the array's own type
(:mod:`cryosiam_dask.backend`), so :mod:`cryosiam_dask.instances.chunked` runs the same code on CPU and GPU
chunks, and :mod:`cryosiam_dask.instances.reference` on the whole volume. All arrays are (z, y, x).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cryosiam_dask.backend import get_ndimage, get_xp, relabel_sequential
from cryosiam_dask.instances.watershed import seeded_watershed

__all__ = [
    "edt_block",
    "final_maps",
    "find_markers",
    "find_markers_with_levels",
    "label_block",
    "marker_levels",
    "segment_block",
    "smooth_block",
]

log = logging.getLogger(__name__)

SIGMA = 0.5
"""Gaussian sigma (voxels) of every smoothing step of the original (skimage.filters.gaussian defaults)."""
EDT_CLIP = 5.0
"""The EDT of the foreground is clipped at this many voxels before it is blurred (distance_type 1 and 2)."""


def smooth_block(a: Any) -> Any:
    """Gaussian σ=0.5 of a float32 block, as skimage.filters.gaussian in CryoSiam.

    Parameters
    ----------
    a : (Z, Y, X) numpy.ndarray or cupy.ndarray of float32

    Returns
    -------
    (Z, Y, X) ndarray of float32, same array type as `a`
        scipy/cupyx ``gaussian_filter(a, 0.5, mode="nearest", truncate=4.0)`` computed in float32
        (bit-identical to skimage's call on float32 input; kernel radius 2).
    """
    xp, ndi = get_xp(a), get_ndimage(a)
    return ndi.gaussian_filter(xp.asarray(a, dtype=xp.float32), SIGMA, mode="nearest", truncate=4.0)


def edt_block(mask: Any) -> Any:
    """Clipped, blurred Euclidean distance transform of a boolean block (CryoSiam's distance_type 1/2 term).

    Parameters
    ----------
    mask : (Z, Y, X) numpy.ndarray or cupy.ndarray of bool
        Foreground (fg >= T).

    Returns
    -------
    (Z, Y, X) ndarray of float64
        ``gaussian(clip(edt(mask), 0, 5), 0.5)``. The EDT measures the distance to the nearest False voxel
        inside the block: the block's border is not background (scipy's convention, as in the original).
        On cupy blocks ``cupyx.scipy.ndimage.distance_transform_edt`` is used.
    """
    xp, ndi = get_xp(mask), get_ndimage(mask)
    e = ndi.distance_transform_edt(mask).astype(xp.float64, copy=False)
    return ndi.gaussian_filter(xp.clip(e, 0, EDT_CLIP), SIGMA, mode="nearest", truncate=4.0)


def label_block(mask: Any) -> tuple[Any, int]:
    """26-connected components of a boolean block, numbered in raster (C) order of their first voxel.

    Returns
    -------
    labels : (Z, Y, X) ndarray of int32
    n : int
        Number of components (same numbering as ``skimage.measure.label(mask)``).
    """
    xp, ndi = get_xp(mask), get_ndimage(mask)
    labels, n = ndi.label(mask, structure=xp.ones((3, 3, 3), dtype=bool))
    return labels, int(n)


def marker_levels(min_center_distance: float, max_center_distance: float) -> np.ndarray:
    """The distance levels above `min_center_distance` at which CryoSiam looks for vanishing components.

    Returns
    -------
    (L,) numpy.ndarray of float64
        ``np.arange(min + 0.5, max + 0.5, 0.5)``; empty when min == max or max < min. The last value is the
        top level (it exceeds max when max - min is not a multiple of 0.5).
    """
    if min_center_distance == max_center_distance:
        return np.zeros(0)
    return np.arange(min_center_distance + 0.5, max_center_distance + 0.5, 0.5)


def find_markers_with_levels(
    distance: Any, min_center_distance: float, max_center_distance: float
) -> tuple[Any, Any]:
    """`find_markers`, also returning the level index at which each marker was taken.

    Returns
    -------
    markers : (Z, Y, X) ndarray of int64
        Marker ids 1..n (0 = none), in CryoSiam's order.
    level_of : (n + 1,) ndarray of int64
        ``level_of[i]`` is the index ``k`` of the level at which marker ``i`` vanished (its extent is the one
        at level ``k - 1``, with level -1 = `min_center_distance`), or ``len(marker_levels(...))`` for the
        components surviving at the top level. Markers sort by (k, raster index of their first voxel): that
        is their id order.
    """
    xp = get_xp(distance)
    init, n_init = label_block(distance >= min_center_distance)
    init = init.astype(xp.int64)
    levels = marker_levels(min_center_distance, max_center_distance)
    markers = xp.zeros(distance.shape, dtype=xp.int64)
    level_list = [xp.zeros(1, dtype=xp.int64)]  # entry for id 0
    n_markers = 0
    for k, t in enumerate(levels):
        cur, n_cur = label_block(distance >= t)
        present = xp.zeros(n_init + 1, dtype=bool)
        present[init[cur > 0]] = True
        vanished = ~present
        vanished[0] = False
        take = vanished[init]
        if bool(take.any()):
            gone = relabel_sequential(xp.where(take, init, 0), offset=n_markers + 1)[0]
            markers = xp.where(take, gone, markers)
            n_new = int(vanished.sum())
            level_list.append(xp.full(n_new, k, dtype=xp.int64))
            n_markers += n_new
        init, n_init = cur.astype(xp.int64), n_cur
    if n_init:
        markers = xp.where(init > 0, init + n_markers, markers)
        level_list.append(xp.full(n_init, len(levels), dtype=xp.int64))
    return markers, xp.concatenate(level_list)


def find_markers(distance: Any, min_center_distance: float, max_center_distance: float) -> Any:
    """CryoSiam's multi-level marker rule ("peaks" of the distance map).

    Parameters
    ----------
    distance : (Z, Y, X) numpy.ndarray or cupy.ndarray of float
        Final distance map.
    min_center_distance, max_center_distance : float
        min_center_distance and max_center_distance (distance thresholds in voxels).

    Returns
    -------
    (Z, Y, X) ndarray of int64
        Markers 1..n. With min == max: the 26-connected components of ``distance >= min``. Otherwise, for each
        level t of ``np.arange(min + 0.5, max + 0.5, 0.5)``, the components of the previous level that have no
        voxel at level t become markers with their previous extent; the components left at the top level are
        added last. Ids go by vanishing level, then raster order of the marker's first voxel; the top-level
        survivors come last in raster order. A component that shrinks or splits is not a marker.
    """
    return find_markers_with_levels(distance, min_center_distance, max_center_distance)[0]


def final_maps(
    foreground: Any, distance: Any, *, threshold_foreground: float, distance_type: int
) -> tuple[Any, Any]:
    """CryoSiam's steps 1 and 3-5: the foreground mask and the final distance map of one block.

    Parameters
    ----------
    foreground, distance : (Z, Y, X) numpy.ndarray or cupy.ndarray of float32
        Raw maps (not modified).

    Returns
    -------
    mask : (Z, Y, X) ndarray of bool
        ``fg >= T`` (fg smoothed first when T < 1).
    distance : (Z, Y, X) ndarray
        float32 for distance_type 0 (and any type other than 1, 2), float64 for types 1 and 2.
    """
    xp = get_xp(distance)
    dist = smooth_block(distance)
    fg = smooth_block(foreground) if threshold_foreground < 1 else xp.asarray(foreground)
    mask = fg >= threshold_foreground
    dist = xp.where((dist < 0) | ~mask, xp.float32(0), dist)
    if distance_type in (1, 2):
        e = edt_block(mask)
        dist = (dist + e) / 2 if distance_type == 1 else e
    return mask, dist


def segment_block(
    foreground: Any,
    distance: Any,
    *,
    min_center_distance: float,
    max_center_distance: float,
    threshold_foreground: float,
    distance_type: int,
) -> tuple[Any, Any, Any, Any, Any]:
    """The whole watershed path on one in-memory block (numpy or cupy), with what the merge needs.

    Returns
    -------
    labels : (Z, Y, X) ndarray of int64
        Instance ids = marker ids (CryoSiam's order within this block).
    markers : (Z, Y, X) ndarray of int64
        The markers (`find_markers`), before the mask drops those of their voxels outside it.
    level_of : (n + 1,) ndarray of int64
        Level index of each marker id (see `find_markers_with_levels`).
    mask : (Z, Y, X) ndarray of bool
        ``fg >= T``.
    distance : (Z, Y, X) ndarray of float
        The final distance map.
    """
    mask, dist = final_maps(
        foreground, distance, threshold_foreground=threshold_foreground, distance_type=distance_type
    )
    markers, level_of = find_markers_with_levels(dist, min_center_distance, max_center_distance)
    labels = seeded_watershed(-dist.astype(get_xp(dist).float64), markers, mask)
    return labels, markers, level_of, mask, dist
