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

Large components (a component touching the chunk and reaching the band of a cut window face: larger than the
halo allows) are made exact by :mod:`cryosiam_dask.instances.components`: each window task also returns its
chunk's support parts (the support's components inside the chunk, exact there since halo > margin) with their
boxes and face planes; the client links parts across chunk faces into the support's global components (26-
connected, as dask-image's ``label``); each component with a part flagged by its window is segmented whole by
one task on its box grown by ``margin + 1`` (clipped to the volume). It stays out of that crop's cut band, so
its keys are the whole-volume keys, and they replace the windows' keys on its voxels (chunk by chunk, in the
final lookup). The id table holds the windows' exact keys and the large components' keys.

Oversized components are the large ones whose crop would not fit the memory of one task (`limit_bytes`,
default 4 GiB = 26.8 million voxels at `components.BYTES_PER_VOXEL` bytes each, e.g. a 299^3 box; the run
layer takes half a worker's memory limit per thread, :func:`cryosiam_dask.run.segment.task_memory_limit`).
They are counted in the report and logged as a warning, and keep the labels of each chunk's own window, with
keys flagged by bit 63 (their ids come after all exact ones); a marker seen whole in two windows keeps one id,
otherwise such a component may be split at chunk faces. A larger halo or memory limit makes them exact.

With ``min_center_distance <= 0`` the support is the whole volume (the final distance is >= 0 everywhere):
one component, segmented whole when it fits.
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
from cryosiam_dask.instances.components import (
    BYTES_PER_VOXEL,
    DEFAULT_LIMIT_BYTES,
    LargeComponent,
    Parts,
    combine_keys,
    component_keys,
    core_parts,
    limit_voxels,
    link_parts,
    plan_large,
)
from cryosiam_dask.instances.windows import Window, margin_for, plan_windows

__all__ = [
    "InstanceReport",
    "check_parameters",
    "id_table",
    "keys_to_ids",
    "make_report",
    "marker_keys",
    "pieces_of",
    "plan_components",
    "segment_instances",
    "table_of",
    "window_keys",
    "window_parts",
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
        Support components larger than one task may hold (see `limit_voxels`), counted once per chunk they
        touch: their labels come from single windows.
    oversized_chunks : int
        Chunks with at least one such component.
    large : int
        Components larger than the halo allows, segmented whole in one task each (exact).
    """

    n_instances: int
    n_chunks: int
    n_skipped: int
    oversized: int
    oversized_chunks: int
    large: int = 0


def marker_keys(markers: Any, level_of: Any, start: ShapeZYX, shape: ShapeZYX) -> Any:
    """The key of every marker id of a block at `start`: ``level * n_voxels + global raster index + 1``.

    Returns
    -------
    (n + 1,) ndarray of uint64
        ``key_of[id]``; entry 0 (background) is 0.
    """
    xp = get_xp(markers)
    ids, first = xp.unique(markers.ravel(), return_index=True)
    z, y, x = xp.unravel_index(first, markers.shape)
    flat = ((z + start[0]) * shape[1] + (y + start[1])) * shape[2] + (x + start[2])
    n_voxels = int(np.prod(shape))
    key_of = xp.zeros(int(level_of.size), dtype=xp.uint64)
    key_of[ids] = (level_of[ids] * n_voxels + flat + 1).astype(xp.uint64)
    key_of[0] = 0
    return key_of


def window_parts(
    foreground: Any,
    distance: Any,
    *,
    start: ShapeZYX,
    core: tuple[slice, slice, slice],
    cut: tuple[tuple[bool, bool], ...],
    shape: ShapeZYX,
    margin: int,
    params: dict[str, Any],
) -> tuple[Any, np.ndarray, int, bool, Parts]:
    """:func:`window_keys`, also returning the chunk's support parts (:func:`components.core_parts`)."""
    xp = get_xp(foreground)
    core_shape = tuple(s.stop - s.start for s in core)
    origin = tuple(o + s.start for o, s in zip(start, core, strict=True))

    def empty() -> tuple[Any, np.ndarray, int, bool, Parts]:
        keys = xp.zeros(core_shape, dtype=xp.uint64)
        parts = Parts.empty(core_shape)
        if params["min_center_distance"] <= 0:  # the final distance (0 here) is in the support everywhere
            support = np.ones(core_shape, bool)
            parts = core_parts(support, ~support, np.zeros(core_shape, np.uint64), origin)  # type: ignore[arg-type]
        return keys, np.zeros(0, np.uint64), 0, True, parts

    if not bool((foreground >= params["threshold_foreground"]).any()):  # smoothing never raises the max
        return empty()
    labels, markers, level_of, mask, dist = segment_block(foreground, distance, **params)
    if not bool(mask.any()):
        return empty()
    support = mask | (dist >= params["min_center_distance"])
    comp, n_comp = label_block(support)
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

    key_of = marker_keys(markers, level_of, start, shape)
    lab, cmp = labels[core], comp[core]
    keys = key_of[lab]
    bad_core = bad[cmp]
    keys = xp.where(bad_core & (lab > 0), keys | xp.uint64(FLAG), keys)
    n_oversized = int(xp.unique(cmp[bad_core]).size)
    unique = to_numpy(xp.unique(keys))
    parts = core_parts(support[core], bad_core, keys, origin)  # type: ignore[arg-type]
    return keys, unique[unique > 0], n_oversized, False, parts


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
        0 = background; bit 63 set on the components reaching the window's cut band.
    unique : (k,) numpy.ndarray of uint64
        The distinct non-zero keys of the core.
    n_oversized : int
        Support components touching the core and reaching the cut band.
    skipped : bool
        True when the window had no fg >= T.
    """
    kw = dict(start=start, core=core, cut=cut, shape=shape, margin=margin, params=params)
    return window_parts(foreground, distance, **kw)[:4]  # type: ignore[arg-type]


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


def plan_components(
    parts: list[Parts],
    windows: list[Window],
    chunks: tuple[tuple[int, ...], ...],
    distance_type: int,
    limit_bytes: int,
) -> tuple[list[LargeComponent], list[int]]:
    """The large components of a volume from its windows' parts, and per window the oversized ones it touches.

    Returns
    -------
    large : list of LargeComponent
        Every support component with a flagged part (:func:`components.plan_large`).
    oversized : list of int
        Per window, the number of large components that do not fit (`LargeComponent.fits`) touching its core.
    """
    shape: ShapeZYX = tuple(int(sum(c)) for c in chunks)  # type: ignore[assignment]
    if not any(bool(p.bad.any()) for p in parts):
        return [], [0] * len(parts)
    component_of, n = link_parts(parts, windows, shape, chunks)
    large, gids = plan_large(parts, component_of, n, shape, margin_for(distance_type), limit_bytes)
    over = np.zeros(n + 1, bool)
    over[[g for g, lc in zip(gids, large, strict=True) if not lc.fits]] = True
    return large, [int(np.unique(c[1:][over[c[1:]]]).size) for c in component_of]


def table_of(
    uniques: list[np.ndarray], large: list[LargeComponent], large_uniques: list[np.ndarray]
) -> np.ndarray:
    """The id table: the windows' exact keys, the keys of large components segmented whole, and the flagged
    window keys of those that do not fit."""
    exact = [np.asarray(u, np.uint64)[np.asarray(u, np.uint64) < FLAG] for u in uniques]
    flagged = [lc.flagged for lc in large if not lc.fits]
    return id_table(exact + flagged + list(large_uniques))


def make_report(
    skipped: list[bool],
    oversized_per_window: list[int],
    large: list[LargeComponent],
    table: np.ndarray,
    limit_bytes: int,
) -> InstanceReport:
    """Sum the windows' statistics into a report; warn about components too large for one task."""
    oversized = sum(oversized_per_window)
    oversized_chunks = sum(n > 0 for n in oversized_per_window)
    if oversized:
        log.warning(
            "%d component(s) in %d chunk(s) are larger than one task may segment whole (a crop of %d voxels, "
            "%d bytes at %d bytes per voxel): their labels come from single windows and may be split at "
            "chunk faces; raise the memory limit or the halo",
            sum(not lc.fits for lc in large),
            oversized_chunks,
            limit_voxels(limit_bytes),
            limit_bytes,
            BYTES_PER_VOXEL,
        )
    report = InstanceReport(
        n_instances=int(table.size),
        n_chunks=len(skipped),
        n_skipped=sum(bool(s) for s in skipped),
        oversized=oversized,
        oversized_chunks=oversized_chunks,
        large=sum(lc.fits for lc in large),
    )
    log.info("instances: %s", report)
    return report


def pieces_of(region: tuple[slice, ...], large: list[LargeComponent], arrays: list[Any]) -> list[Any]:
    """The (array, crop) pairs of the fitting large components whose crop meets `region`."""
    fits = [lc for lc in large if lc.fits]
    return [
        (a, lc.crop)
        for lc, a in zip(fits, arrays, strict=True)
        if all(c.start < r.stop and r.start < c.stop for c, r in zip(lc.crop, region, strict=True))
    ]


def _combine(keys: Any, region: tuple[slice, ...], crops: list[Any], *arrays: Any) -> Any:
    return combine_keys(keys, region, list(zip(arrays, crops, strict=True)))


def segment_instances(
    foreground: Any,
    distance: Any,
    *,
    threshold_foreground: float,
    min_center_distance: float,
    max_center_distance: float,
    distance_type: int,
    halo: int | tuple[int, int, int] = 32,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
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
        (margin 9, or 3 for distance_type 0) beyond a chunk are exact per chunk; larger ones are segmented
        whole, one task each.
    limit_bytes : int, default 4 GiB
        Memory one such task may use (`BYTES_PER_VOXEL` per voxel of the component's box + margin + 1);
        larger components keep their windows' labels and are reported as oversized.

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
    task = dask.delayed(window_parts, pure=True)
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
    stats = dask.compute(*[dask.delayed(operator.itemgetter(1, 3, 4))(t) for t in tasks])
    large, over = plan_components([s[2] for s in stats], windows, fg.chunks, distance_type, limit_bytes)
    fits = [lc for lc in large if lc.fits]
    ltask = dask.delayed(component_keys, pure=True)
    ltasks = list(
        dask.persist(
            *[
                ltask(fg[lc.crop], dist[lc.crop], crop=lc.crop, seed=lc.seed, shape=shape, params=params)
                for lc in fits
            ]
        )
    )
    luniques = dask.compute(*[dask.delayed(operator.itemgetter(1))(t) for t in ltasks])
    table = table_of([s[0] for s in stats], large, list(luniques))
    report = make_report([s[1] for s in stats], over, large, table, limit_bytes)
    larrays = [dask.delayed(operator.itemgetter(0))(t) for t in ltasks]
    meta = fg._meta.astype(np.uint64)
    blocks = np.empty(fg.numblocks, dtype=object)
    for w, t in zip(windows, tasks, strict=True):
        core_shape = tuple(s.stop - s.start for s in w.region)
        item = dask.delayed(operator.itemgetter(0))(t)
        pieces = pieces_of(w.region, large, larrays)
        if pieces:
            crops = [c for _, c in pieces]
            item = dask.delayed(_combine, pure=True)(item, w.region, crops, *[a for a, _ in pieces])
        blocks[w.index] = da.from_delayed(item, shape=core_shape, dtype=np.uint64, meta=meta)
    keys = da.block(blocks.tolist())
    labels = keys.map_blocks(keys_to_ids, table, dtype=np.uint32, meta=fg._meta.astype(np.uint32))
    return labels, report
