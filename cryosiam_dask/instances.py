"""CryoSiam's post-processing (maps -> instances), in memory and per block; an xp-generic seeded watershed.

`instance_segmentation` is the in-memory reference: it reproduces CryoSiam's `instance_segmentation`
(`apps/dense_simsiam_instance/instance_segmentation.py`, watershed path) voxel for voxel and id for id. The
`*_block` helpers and `seeded_watershed` take numpy or cupy arrays and pick the array module from the array's
own type (`cryosiam_dask._backend`), so `merge.py` runs the same code on CPU and GPU chunks.
All arrays are (z, y, x).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cryosiam_dask._backend import get_ndimage, get_xp, is_cupy
from cryosiam_dask.errors import ConfigError, NotSupportedError

__all__ = [
    "find_markers",
    "instance_segmentation",
    "marker_levels",
    "seeded_watershed",
    "segment_block",
]

log = logging.getLogger(__name__)

SIGMA = 0.5
"""Gaussian sigma (voxels) of every smoothing step of the original (skimage.filters.gaussian defaults)."""
EDT_CLIP = 5.0
"""The EDT of the foreground is clipped at this many voxels before it is blurred (distance_type 1 and 2)."""
MULTICUT_MESSAGE = (
    "network.postprocessing: True (CryoSiam's multicut with elf/nifty and ITK) is not supported; "
    "set network.postprocessing: False to use the seeded watershed (the docs' config)"
)


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


def _relabel_sequential(labels: Any, offset: int = 1) -> Any:
    """Map the non-zero values of `labels` to offset, offset+1, ... keeping their order (0 stays 0)."""
    xp = get_xp(labels)
    values, inverse = xp.unique(labels, return_inverse=True)
    new = xp.arange(offset - 1, offset - 1 + values.size, dtype=xp.int64)
    if values.size and values[0] == 0:
        new[0] = 0
    else:
        new += 1
    return new[inverse.reshape(labels.shape)]


def marker_levels(threshold_min: float, threshold_max: float) -> np.ndarray:
    """The distance levels above `threshold_min` at which CryoSiam looks for vanishing components.

    Returns
    -------
    (L,) numpy.ndarray of float64
        ``np.arange(min + 0.5, max + 0.5, 0.5)``; empty when min == max or max < min. The last value is the
        top level (it exceeds max when max - min is not a multiple of 0.5).
    """
    if threshold_min == threshold_max:
        return np.zeros(0)
    return np.arange(threshold_min + 0.5, threshold_max + 0.5, 0.5)


def find_markers_with_levels(distance: Any, threshold_min: float, threshold_max: float) -> tuple[Any, Any]:
    """`find_markers`, also returning the level index at which each marker was taken.

    Returns
    -------
    markers : (Z, Y, X) ndarray of int64
        Marker ids 1..n (0 = none), in CryoSiam's order.
    level_of : (n + 1,) ndarray of int64
        ``level_of[i]`` is the index ``k`` of the level at which marker ``i`` vanished (its extent is the one
        at level ``k - 1``, with level -1 = `threshold_min`), or ``len(marker_levels(...))`` for the
        components surviving at the top level. Markers sort by (k, raster index of their first voxel): that
        is their id order.
    """
    xp = get_xp(distance)
    init, n_init = label_block(distance >= threshold_min)
    init = init.astype(xp.int64)
    levels = marker_levels(threshold_min, threshold_max)
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
            gone = _relabel_sequential(xp.where(take, init, 0), offset=n_markers + 1)
            markers = xp.where(take, gone, markers)
            n_new = int(vanished.sum())
            level_list.append(xp.full(n_new, k, dtype=xp.int64))
            n_markers += n_new
        init, n_init = cur.astype(xp.int64), n_cur
    if n_init:
        markers = xp.where(init > 0, init + n_markers, markers)
        level_list.append(xp.full(n_init, len(levels), dtype=xp.int64))
    return markers, xp.concatenate(level_list)


def find_markers(distance: Any, threshold_min: float, threshold_max: float) -> Any:
    """CryoSiam's multi-level marker rule ("peaks" of the distance map).

    Parameters
    ----------
    distance : (Z, Y, X) numpy.ndarray or cupy.ndarray of float
        Final distance map.
    threshold_min, threshold_max : float
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
    return find_markers_with_levels(distance, threshold_min, threshold_max)[0]


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


def _check_options(threshold_min: float, threshold_max: float, distance_type: int) -> None:
    for name, v in (("min_center_distance", threshold_min), ("max_center_distance", threshold_max)):
        if not np.isfinite(v):
            raise ConfigError(f"parameters.network.{name} must be a finite number, got {v!r}")
    if not isinstance(distance_type, (int, np.integer)):
        raise ConfigError(f"parameters.network.distance_type must be an integer, got {distance_type!r}")


def final_maps(
    foreground: Any, distance: Any, *, assignment_threshold: float, distance_type: int
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
    fg = smooth_block(foreground) if assignment_threshold < 1 else xp.asarray(foreground)
    mask = fg >= assignment_threshold
    dist = xp.where((dist < 0) | ~mask, xp.float32(0), dist)
    if distance_type in (1, 2):
        e = edt_block(mask)
        dist = (dist + e) / 2 if distance_type == 1 else e
    return mask, dist


def segment_block(
    foreground: Any,
    distance: Any,
    *,
    threshold_min: float,
    threshold_max: float,
    assignment_threshold: float,
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
        foreground, distance, assignment_threshold=assignment_threshold, distance_type=distance_type
    )
    markers, level_of = find_markers_with_levels(dist, threshold_min, threshold_max)
    labels = seeded_watershed(-dist.astype(get_xp(dist).float64), markers, mask)
    return labels, markers, level_of, mask, dist


def instance_segmentation(
    foreground: np.ndarray,
    distance: np.ndarray,
    boundary: np.ndarray | None = None,
    *,
    threshold_min: float = 0,
    threshold_max: float = 5,
    boundary_bias: float = 0.45,
    assignment_threshold: float = 0.4,
    distance_type: int = 0,
    postprocessing: bool = False,
) -> np.ndarray:
    """CryoSiam's post-processing of the three network maps into instances, on the whole volume in memory.

    Parameters
    ----------
    foreground : (Z, Y, X) numpy.ndarray of float32
        Foreground probability (after the lamella mask).
    distance : (Z, Y, X) numpy.ndarray of float32
        Raw distance regression.
    boundary : (Z, Y, X) numpy.ndarray of float32 or None
        Boundary probability; only the multicut would use it, so it is ignored.
    threshold_min, threshold_max : float, defaults 0 and 5
        min_center_distance and max_center_distance: distance levels in voxels for the markers.
    boundary_bias : float, default 0.45
        Multicut bias; unused on the watershed path.
    assignment_threshold : float, default 0.4
        threshold_foreground T: voxels with (smoothed, if T < 1) fg >= T are flooded.
    distance_type : int, default 0
        0: predicted distance; 1: mean of it and the blurred, clipped EDT of fg >= T; 2: that EDT only.
    postprocessing : bool, default False
        True asks for CryoSiam's multicut, which is not supported (`NotSupportedError`).

    Returns
    -------
    (Z, Y, X) numpy.ndarray of uint32
        Instance ids (0 = background), exactly CryoSiam's ids: by vanishing level, then raster order.

    Examples
    --------
    >>> fg = np.zeros((9, 9, 9), np.float32); fg[2:7, 2:7, 2:7] = 1
    >>> lab = instance_segmentation(fg, fg * 3, threshold_min=1, threshold_max=2, assignment_threshold=0.5,
    ...                             distance_type=1)
    >>> int(lab.max())
    1
    """
    if postprocessing and boundary_bias != 1:
        raise NotSupportedError(MULTICUT_MESSAGE)
    _check_options(threshold_min, threshold_max, distance_type)
    foreground, distance = np.asarray(foreground), np.asarray(distance)
    if foreground.shape != distance.shape or foreground.ndim != 3:
        raise ConfigError(
            f"foreground {foreground.shape} and distance {distance.shape} must be 3-d arrays of one shape"
        )
    labels = segment_block(
        foreground,
        distance,
        threshold_min=threshold_min,
        threshold_max=threshold_max,
        assignment_threshold=assignment_threshold,
        distance_type=distance_type,
    )[0]
    return labels.astype(np.uint32)
