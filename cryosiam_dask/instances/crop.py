"""CryoSiam's instances of a crop of a volume, equal to the whole volume's there: for tuning on a crop.

:func:`segment_crop` segments a region around the crop with the chunked code's block functions and grows
the region until every support component touching the crop lies inside it, away from its cut faces, the
argument that makes a window of :mod:`cryosiam_dask.instances.windows` exact: CryoSiam's post-processing
is local to a 26-connected component of ``support = (fg >= T) | (distance >= min_center_distance)``, and
inside a region everything is exact except within ``margin`` voxels of a face that is not a volume face.
So the crop's labels are the whole volume's partition restricted to the crop, and their ids keep the whole
run's order (they are ranked by the same marker keys, :mod:`cryosiam_dask.instances.keys`).

The region starts as the crop plus the halo. A component touching the crop that reaches the cut band of a
face extends the region on that side (by the halo or the region's size, whichever is larger) until none
does, or until the region would exceed `limit_voxels`: then the result is marked inexact (such components
may be cut). With ``min_center_distance <= 0`` the support is the whole volume, so the region grows to it.

The multicut (``postprocessing``) is solved on the fragments of those components and the background node,
not on the whole volume's graph: the edges of a fragment and their smoothed boundary values are exact, and
with bioimage-cpp's greedy additive contraction + Kernighan-Lin the clusters of disjoint components do not
interact except through ties between exactly equal costs; tested equal to the whole run on the demo data
(``tests/napari/test_tuning.py``), not proven in general.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.components import DEFAULT_LIMIT_BYTES, limit_voxels
from cryosiam_dask.instances.params import PostParams

__all__ = ["CropResult", "check_crop", "segment_crop"]

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class CropResult:
    """The instances of a crop.

    Attributes
    ----------
    labels : (cz, cy, cx) numpy.ndarray of uint32
        Instance ids of the crop, 0 = background, 1..n in the whole run's id order.
    crop : three slices
        The crop in the volume.
    region : three slices
        The region that was segmented (the crop and every support component touching it, with context).
    n_instances : int
        Distinct instances in the crop.
    exact : bool
        False when a component touching the crop would have needed a region above the limit.
    multicut : bool
        The multicut ran.
    seconds : float
        Wall time.
    """

    labels: np.ndarray
    crop: Box
    region: Box
    n_instances: int
    exact: bool
    multicut: bool
    seconds: float


def check_crop(crop: Any, shape: ShapeZYX) -> Box:
    """`crop` as three slices inside a volume of `shape`; ParameterError naming it otherwise.

    Parameters
    ----------
    crop : three slices, or three (start, stop) pairs
        (z, y, x), stop exclusive.
    shape : (Z, Y, X)
    """
    try:
        pairs = [(s.start, s.stop) if isinstance(s, slice) else tuple(s) for s in crop]
        out = tuple(slice(int(a), int(b)) for a, b in pairs)
    except (TypeError, ValueError) as e:
        raise ParameterError("crop", f"must be three (start, stop) pairs (z, y, x), got {crop!r}") from e
    if len(out) != 3 or any(not 0 <= s.start < s.stop <= n for s, n in zip(out, shape, strict=False)):
        raise ParameterError("crop", f"{crop!r} is empty or outside the volume {tuple(shape)}")
    return out  # type: ignore[return-value]


def _read(array: Any, box: Box) -> np.ndarray:
    """``array[box]`` as a float32 numpy array (numpy, zarr, h5py or dask)."""
    part = array[box]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part, dtype=np.float32)


def _grow(box: Box, by: int | tuple[int, ...], shape: ShapeZYX) -> Box:
    by3 = (by,) * 3 if isinstance(by, int) else by
    return tuple(  # type: ignore[return-value]
        slice(max(0, s.start - b), min(n, s.stop + b)) for s, b, n in zip(box, by3, shape, strict=True)
    )


def _relative(inner: Box, outer: Box) -> Box:
    return tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(inner, outer, strict=True))  # type: ignore[return-value]


def _voxels(box: Box) -> int:
    return int(np.prod([s.stop - s.start for s in box]))


def _segment_region(foreground: Any, distance: Any, region: Box, crop: Box, params: PostParams) -> dict:
    """Segment `region`; the components touching the crop and which cut faces they reach."""
    from cryosiam_dask.instances.block import label_block, segment_block

    fg, dist_raw = _read(foreground, region), _read(distance, region)
    labels, markers, level_of, mask, dist = segment_block(fg, dist_raw, **params.watershed_kwargs())
    comp, _ = label_block(mask | (dist >= params.min_center_distance))
    touching = np.unique(comp[_relative(crop, region)])
    keep = np.isin(comp, touching[touching > 0])
    return {"labels": labels, "markers": markers, "level_of": level_of, "keep": keep}


def _faces_hit(keep: np.ndarray, region: Box, shape: ShapeZYX, margin: int) -> list[tuple[int, int]]:
    """(axis, side) of each cut face whose band (`margin` voxels) holds a kept voxel; side 0 low, 1 high."""
    hit = []
    for axis in range(3):
        s, n = region[axis], shape[axis]
        for side, cut in ((0, s.start > 0), (1, s.stop < n)):
            if not cut:
                continue
            index = [slice(None)] * 3
            index[axis] = slice(0, margin) if side == 0 else slice(keep.shape[axis] - margin, None)
            if keep[tuple(index)].any():
                hit.append((axis, side))
    return hit


def _next_region(keep: np.ndarray, region: Box, crop: Box, hit: list[tuple[int, int]],
                 shape: ShapeZYX, params: PostParams) -> Box:
    """The kept components' box with context, extended on every side in `hit`, joined with the crop's."""
    found = np.nonzero(keep)
    lo = [int(f.min()) + s.start for f, s in zip(found, region, strict=True)]
    hi = [int(f.max()) + 1 + s.start for f, s in zip(found, region, strict=True)]
    box = _grow(tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), params.margin + 1, shape)  # type: ignore[arg-type]
    base = _grow(crop, params.margin + 1, shape)
    out = [slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, base, strict=True)]
    for axis, side in hit:
        step = max(params.halo, region[axis].stop - region[axis].start)
        s = out[axis]
        if side == 0:
            out[axis] = slice(max(0, s.start - step), s.stop)
        else:
            out[axis] = slice(s.start, min(shape[axis], s.stop + step))
    return tuple(out)  # type: ignore[return-value]


def _multicut_region(ws: np.ndarray, boundary: Any, region: Box, shape: ShapeZYX, bias: float) -> np.ndarray:
    """CryoSiam's multicut of the fragments `ws` (on `region`), the boundary smoothed around them only."""
    from cryosiam_dask.instances.bilateral import bilateral_filter_valid, bilateral_reach
    from cryosiam_dask.instances.edges import edge_stats
    from cryosiam_dask.instances.multicut import check_multicut_available, final_id_table, solve_multicut

    check_multicut_available()
    found = np.nonzero(ws)
    if not found[0].size:
        return ws
    # the fragments' box + 1: every voxel pair an edge of theirs sums lies in it
    sub = tuple(slice(max(0, int(f.min()) - 1), min(n, int(f.max()) + 2))
                for f, n in zip(found, ws.shape, strict=True))
    absolute = tuple(slice(s.start + r.start, s.stop + r.start) for s, r in zip(sub, region, strict=True))
    r = bilateral_reach(1.0)
    reach = _grow(absolute, r, shape)  # type: ignore[arg-type]
    pad = tuple((a.start - (b.start - r), (b.stop + r) - a.stop)
                for a, b in zip(reach, absolute, strict=True))
    values = _read(boundary, reach)
    if any(map(any, pad)):  # ITK's zero-flux boundary at the volume's faces, as the chunked path
        values = np.pad(values, pad, mode="edge")
    smoothed = bilateral_filter_valid(values, domain_sigma=1.0, range_sigma=0.1)
    u, v, sums, counts = edge_stats(ws[sub], smoothed)
    node_labels = solve_multicut(u, v, sums, counts, boundary_bias=bias, n_nodes=int(ws.max()) + 1)
    lut = final_id_table(node_labels, np.unique(ws))
    return lut[ws]


def segment_crop(
    foreground: Any,
    distance: Any,
    crop: Any,
    params: PostParams,
    *,
    boundary: Any = None,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
) -> CropResult:
    """The instances of `crop`: the whole volume's partition there (see the module's notes).

    Parameters
    ----------
    foreground, distance : (Z, Y, X) arrays of float32
        The whole volume's maps (after the lamella mask), anything sliceable: numpy, zarr, h5py or dask
        arrays; only the region around the crop is read.
    crop : three slices or (start, stop) pairs
        (z, y, x) voxels, stop exclusive.
    params : PostParams
        The post-processing; its halo is the first context around the crop.
    boundary : (Z, Y, X) array of float32, optional
        The boundary map, needed when ``params.multicut_on``.
    limit_bytes : int, default 4 GiB
        Largest region (at the chunked code's bytes per voxel) the crop may grow to.

    Returns
    -------
    CropResult

    Examples
    --------
    >>> fg = np.zeros((40, 40, 40), np.float32); fg[5:15, 5:15, 5:15] = 1; fg[25:35, 20:30, 5:15] = 1
    >>> res = segment_crop(fg, fg * 4, ((0, 20), (0, 20), (0, 20)),
    ...                    PostParams(threshold_foreground=0.5, min_center_distance=1, max_center_distance=3))
    >>> res.n_instances
    1
    """
    from cryosiam_dask.instances.keys import marker_keys

    t0 = time.perf_counter()
    shape: ShapeZYX = tuple(int(s) for s in foreground.shape)  # type: ignore[assignment]
    if tuple(distance.shape) != shape or len(shape) != 3:
        raise ParameterError(
            "foreground", f"{shape} and distance {tuple(distance.shape)} must be 3-d arrays of one shape"
        )
    if params.multicut_on and boundary is None:
        raise ParameterError("boundary", "is needed by the multicut (postprocessing=True)")
    crop = check_crop(crop, shape)
    region, exact = _grow(crop, params.halo, shape), True
    while True:
        seg = _segment_region(foreground, distance, region, crop, params)
        hit = _faces_hit(seg["keep"], region, shape, params.margin)
        if not hit:
            break
        grown = _next_region(seg["keep"], region, crop, hit, shape, params)
        if _voxels(grown) > limit_voxels(limit_bytes):
            exact = False
            break
        region = grown
    start = tuple(s.start for s in region)
    key_of = marker_keys(seg["markers"], seg["level_of"], start, shape)  # type: ignore[arg-type]
    keys = np.where(seg["keep"], key_of[seg["labels"]], np.uint64(0))
    table, ws = np.unique(keys, return_inverse=True)  # keys sorted: the whole run's id order
    ws = ws.reshape(keys.shape).astype(np.uint32)
    if table[0] != 0:
        ws += 1
    multicut = params.multicut_on
    if multicut:
        ws = _multicut_region(ws, boundary, region, shape, params.boundary_bias)
    labels = ws[_relative(crop, region)]
    ids = np.unique(labels)
    return CropResult(np.ascontiguousarray(labels, dtype=np.uint32), crop, region, int((ids > 0).sum()),
                      exact, multicut, time.perf_counter() - t0)
