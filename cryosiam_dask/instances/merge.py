"""Chunked instances with global ids: CryoSiam's post-processing per chunk + halo, ids from canonical keys.

Why this is exact. CryoSiam's post-processing is component-local: nothing crosses the boundary of a
26-connected component of ``support = (fg >= T) | (distance >= min_center_distance)`` (every marker lies in
`support`, and the watershed floods only fg >= T). Each chunk runs the in-memory code
(`instances.segment_block`) on its window (the chunk plus `halo` voxels, clipped to the volume). Inside the
window everything is exact except near a window face that is not a volume face: the Gaussians (radius 2) and
the clipped EDT (5) reach at most `margin` = 9 voxels (3 for distance_type 0). A support component that
touches the chunk and stays out of that band is a whole-volume component, so its markers and its watershed
equal the whole-volume ones (relative raster order, and with it skimage's first-in-first-out tie order, is
unchanged by translation).

Ids. Every marker gets a key that every chunk seeing it computes alike:
``key = level * n_voxels + global raster index of its first voxel + 1``, where level is the index of the level
at which it vanished (`instances.find_markers_with_levels`). Sorting the keys is CryoSiam's id order (by
vanishing level, then raster order), so the ids 1..N equal the original's whenever no marker lies wholly
outside fg >= T (CryoSiam then leaves a gap in its ids; here they stay consecutive).

Oversized components (touching the chunk and reaching the band of a cut window face: larger than the halo
allows) are counted in the report and logged as a warning. They keep the labels of the chunk's own window,
with keys flagged by bit 63 (their ids come after all exact ones); a marker seen whole in two windows keeps
one id, otherwise such a component may be split at chunk faces. A larger halo makes them exact.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.backend import get_xp, to_numpy
from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.block import label_block, segment_block
from cryosiam_dask.instances.windows import as_halo3, margin_for, plan_windows

__all__ = [
    "InstanceReport",
    "check_parameters",
    "id_table",
    "keys_to_ids",
    "make_report",
    "segment_instances",
    "window_keys",
]

log = logging.getLogger(__name__)

FLAG = np.uint64(1 << 63)
"""Bit set on the keys of oversized components (their ids sort after the exact ones)."""


@dataclass(frozen=True)
class InstanceReport:
    """What `segment_instances` did.

    Attributes
    ----------
    n_instances : int
        Number of instances (ids 1..n_instances).
    n_chunks : int
        Number of chunks.
    n_skipped : int
        Chunks whose window had no fg >= T: no work was done there.
    oversized : int
        Support components larger than the halo allows, counted once per chunk they touch.
    oversized_chunks : int
        Chunks with at least one such component.
    """

    n_instances: int
    n_chunks: int
    n_skipped: int
    oversized: int
    oversized_chunks: int


def window_keys(
    foreground: Any,
    distance: Any,
    *,
    start: ShapeZYX,
    core: tuple[slice, slice, slice],
    cut: tuple[tuple[bool, bool], ...],
    shape: ShapeZYX,
    margin: int,
    params: dict[str, Any],
) -> tuple[Any, np.ndarray, int, bool]:
    """Segment one window and return the keys of its core.

    Parameters
    ----------
    foreground, distance : (z, y, x) numpy.ndarray or cupy.ndarray of float32
        The window (chunk + halo, clipped to the volume).
    start : (z, y, x)
        Window origin in the volume.
    core : three slices
        The chunk inside the window.
    cut : three (low, high) pairs
        Whether that window face is inside the volume (not a volume face).
    shape : (z, y, x)
        The volume's shape.
    margin : int
        :func:`margin_for` the distance type.
    params : dict
        The post-processing parameters of :func:`~cryosiam_dask.instances.block.segment_block`.

    Returns
    -------
    keys : (cz, cy, cx) ndarray of uint64
        0 = background; bit 63 set on oversized components.
    unique : (k,) numpy.ndarray of uint64
        The distinct non-zero keys of the core.
    n_oversized : int
        Oversized support components touching the core.
    skipped : bool
        True when the window had no fg >= T.
    """
    xp = get_xp(foreground)
    core_shape = tuple(s.stop - s.start for s in core)
    empty = (xp.zeros(core_shape, dtype=xp.uint64), np.zeros(0, dtype=np.uint64), 0, True)
    if not bool((foreground >= params["threshold_foreground"]).any()):  # smoothing never raises the max
        return empty
    labels, markers, level_of, mask, dist = segment_block(foreground, distance, **params)
    if not bool(mask.any()):
        return empty
    comp, n_comp = label_block(mask | (dist >= params["min_center_distance"]))
    band = xp.zeros(comp.shape, dtype=bool)
    for axis, (lo, hi) in enumerate(cut):
        index = [slice(None)] * 3
        if lo:
            index[axis] = slice(0, margin)
            band[tuple(index)] = True
        if hi:
            index[axis] = slice(comp.shape[axis] - margin, None)
            band[tuple(index)] = True
    bad = xp.zeros(n_comp + 1, dtype=bool)
    bad[comp[band]] = True
    bad[0] = False

    ids, first = xp.unique(markers.ravel(), return_index=True)
    z, y, x = xp.unravel_index(first, markers.shape)
    flat = ((z + start[0]) * shape[1] + (y + start[1])) * shape[2] + (x + start[2])
    n_voxels = int(np.prod(shape))
    key_of = xp.zeros(int(level_of.size), dtype=xp.uint64)
    key_of[ids] = (level_of[ids] * n_voxels + flat + 1).astype(xp.uint64)
    key_of[0] = 0

    lab, cmp = labels[core], comp[core]
    keys = key_of[lab]
    keys = xp.where(bad[cmp] & (lab > 0), keys | xp.uint64(FLAG), keys)
    n_oversized = int(xp.unique(cmp[bad[cmp]]).size)
    unique = to_numpy(xp.unique(keys))
    return keys, unique[unique > 0], n_oversized, False


def keys_to_ids(keys: Any, table: np.ndarray) -> Any:
    """Map keys (uint64) to ids 1..N (uint32) through the sorted key table; 0 stays 0."""
    xp = get_xp(keys)
    table = xp.asarray(table)
    ids = xp.searchsorted(table, keys) + 1
    return xp.where(keys > 0, ids, 0).astype(xp.uint32)


def check_parameters(min_center_distance: float, max_center_distance: float) -> None:
    """Raise ParameterError for a non-finite distance level."""
    for name, v in (
        ("min_center_distance", min_center_distance),
        ("max_center_distance", max_center_distance),
    ):
        if not np.isfinite(v):
            raise ParameterError(name, f"must be a finite number, got {v!r}")


def id_table(uniques: list[np.ndarray]) -> np.ndarray:
    """The sorted table of every window's distinct keys: the position of a key + 1 is its instance id."""
    return np.unique(np.concatenate([np.asarray(u, np.uint64) for u in uniques] + [np.zeros(0, np.uint64)]))


def make_report(stats: list[tuple[np.ndarray, int, bool]], table: np.ndarray, halo: Any) -> InstanceReport:
    """Sum the windows' ``(unique, n_oversized, skipped)`` into a report; warn about oversized components."""
    oversized = sum(int(s[1]) for s in stats)
    oversized_chunks = sum(int(s[1]) > 0 for s in stats)
    if oversized:
        log.warning(
            "%d component(s) in %d chunk(s) are larger than the halo %s allows: their labels come from "
            "single windows and may be split at chunk faces; use a larger halo",
            oversized,
            oversized_chunks,
            as_halo3(halo),
        )
    report = InstanceReport(
        n_instances=int(table.size),
        n_chunks=len(stats),
        n_skipped=sum(bool(s[2]) for s in stats),
        oversized=oversized,
        oversized_chunks=oversized_chunks,
    )
    log.info("instances: %s", report)
    return report


def segment_instances(
    foreground: Any,
    distance: Any,
    *,
    threshold_foreground: float,
    min_center_distance: float,
    max_center_distance: float,
    distance_type: int,
    halo: int | tuple[int, int, int] = 32,
) -> tuple[da.Array, InstanceReport]:
    """CryoSiam's instances of a chunked volume, with ids unique across it (the windows persisted in memory).

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask.array.Array of float32
        The network maps (after the lamella mask); numpy or cupy chunks. `distance` is rechunked like
        `foreground`.
    threshold_foreground, min_center_distance, max_center_distance, distance_type
        As in :func:`cryosiam_dask.instances.reference.instance_segmentation`.
    halo : int or (z, y, x) ints, default 32
        Context read around each chunk. Objects (support components) extending up to ``halo - margin`` voxels
        (margin 9, or 3 for distance_type 0) beyond a chunk are exact; larger ones are reported as oversized.

    Returns
    -------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background, consecutive 1..N across the whole volume: the same partition as
        `instance_segmentation` on the whole volume (and the same ids, see the module notes).
    report : InstanceReport

    Notes
    -----
    The windows are segmented when this function is called (persisted on the cluster when a `distributed`
    client is active); `labels` is a lazy lookup of the persisted keys. For volumes larger than the cluster's
    memory the run layer (:mod:`cryosiam_dask.run.segment`) writes each window's keys to zarr instead.
    """
    fg, dist = da.asarray(foreground), da.asarray(distance)
    if fg.ndim != 3 or fg.shape != dist.shape:
        raise ParameterError(
            "foreground", f"{fg.shape} and distance {dist.shape} must be 3-d arrays of one shape"
        )
    check_parameters(min_center_distance, max_center_distance)
    windows = plan_windows(fg.chunks, halo, distance_type)
    dist = dist.rechunk(fg.chunks)
    shape: ShapeZYX = tuple(int(s) for s in fg.shape)  # type: ignore[assignment]
    params = dict(
        threshold_foreground=threshold_foreground,
        min_center_distance=min_center_distance,
        max_center_distance=max_center_distance,
        distance_type=distance_type,
    )
    task = dask.delayed(window_keys, pure=True)
    tasks = [
        task(
            fg[w.window],
            dist[w.window],
            start=w.start,
            core=w.core,
            cut=w.cut,
            shape=shape,
            margin=margin_for(distance_type),
            params=params,
        )
        for w in windows
    ]
    tasks = list(dask.persist(*tasks))
    stats = dask.compute(*[dask.delayed(operator.itemgetter(1, 2, 3))(t) for t in tasks])
    table = id_table([s[0] for s in stats])
    report = make_report(list(stats), table, halo)
    meta = fg._meta.astype(np.uint64)
    blocks = np.empty(fg.numblocks, dtype=object)
    for w, t in zip(windows, tasks, strict=True):
        core_shape = tuple(s.stop - s.start for s in w.region)
        item = dask.delayed(operator.itemgetter(0))(t)
        blocks[w.index] = da.from_delayed(item, shape=core_shape, dtype=np.uint64, meta=meta)
    keys = da.block(blocks.tolist())
    labels = keys.map_blocks(keys_to_ids, table, dtype=np.uint32, meta=fg._meta.astype(np.uint32))
    return labels, report
