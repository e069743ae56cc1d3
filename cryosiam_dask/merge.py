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
from itertools import product
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask._backend import get_xp, to_numpy
from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import ConfigError, NotSupportedError
from cryosiam_dask.instances import MULTICUT_MESSAGE, label_block, segment_block

__all__ = ["InstanceReport", "segment_instances"]

log = logging.getLogger(__name__)

FLAG = np.uint64(1 << 63)
"""Bit set on the keys of oversized components (their ids sort after the exact ones)."""


def margin_for(distance_type: int) -> int:
    """Width (voxels) of the band at a cut window face where the window's maps may differ from the volume's.

    2 for the Gaussians, + 5 for the clipped EDT + 2 for its blur (types 1 and 2), + 1 so that a trusted
    component's neighbours are exact too.
    """
    return 9 if distance_type in (1, 2) else 3


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


def _halo3(halo: int | tuple[int, int, int]) -> ShapeZYX:
    values = (halo,) * 3 if isinstance(halo, (int, np.integer)) else tuple(halo)
    if len(values) != 3 or not all(isinstance(h, (int, np.integer)) and h >= 0 for h in values):
        raise ConfigError(f"cryosiam_dask.halo must be an int >= 0 or three of them (z, y, x), got {halo!r}")
    return tuple(int(h) for h in values)  # type: ignore[return-value]


def _window_keys(
    foreground: Any,
    distance: Any,
    *,
    start: ShapeZYX,
    core: tuple[slice, slice, slice],
    cut: tuple[tuple[bool, bool], ...],
    shape: ShapeZYX,
    margin: int,
    params: dict,
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
    if not bool((foreground >= params["assignment_threshold"]).any()):  # smoothing never raises the max
        return empty
    labels, markers, level_of, mask, dist = segment_block(foreground, distance, **params)
    if not bool(mask.any()):
        return empty
    comp, n_comp = label_block(mask | (dist >= params["threshold_min"]))
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


def _window_keys_to_store(
    foreground: Any,
    distance: Any,
    *,
    store: Any,
    region: tuple[slice, ...],
    records: Any = None,
    index: tuple[int, ...] = (),
    **kwargs: Any,
) -> tuple[None, np.ndarray, int, bool]:
    """`_window_keys`, writing the core's keys into ``store[region]`` (zarr) instead of returning them.

    Each region is one whole chunk of ``store``, so concurrent tasks never write the same zarr chunk and a
    task that is re-run (lost worker, resume) rewrites the same bytes. With ``records``, the window's small
    statistics are saved after the keys (``records.save(index, unique=, oversized=, skipped=)``).
    """
    keys, unique, n_oversized, skipped = _window_keys(foreground, distance, **kwargs)
    store[region] = to_numpy(keys)
    if records is not None:
        records.save(index, unique=unique, oversized=n_oversized, skipped=skipped)
    return None, unique, n_oversized, skipped


def _lookup(keys: Any, table: np.ndarray) -> Any:
    """Map keys (uint64) to ids 1..N (uint32) through the sorted key table; 0 stays 0."""
    xp = get_xp(keys)
    table = xp.asarray(table)
    ids = xp.searchsorted(table, keys) + 1
    return xp.where(keys > 0, ids, 0).astype(xp.uint32)


def segment_instances(
    foreground: da.Array,
    distance: da.Array,
    *,
    threshold_min: float,
    threshold_max: float,
    assignment_threshold: float,
    distance_type: int,
    halo: int | tuple[int, int, int] = 32,
    boundary: da.Array | None = None,
    postprocessing: bool = False,
    keys_store: Any = None,
    records: Any = None,
) -> tuple[da.Array, InstanceReport]:
    """CryoSiam's instances of a chunked volume, with ids unique across it.

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask.array.Array of float32
        The network maps (after the lamella mask); numpy or cupy chunks. `distance` is rechunked like
        `foreground`.
    threshold_min, threshold_max, assignment_threshold, distance_type
        As in `instances.instance_segmentation`.
    halo : int or (z, y, x) ints, default 32
        Context read around each chunk. Objects (support components) extending up to ``halo - margin`` voxels
        (margin 9, or 3 for distance_type 0) beyond a chunk are exact; larger ones are reported as oversized.
    boundary : (Z, Y, X) dask.array.Array or None
        Only the multicut uses it; ignored.
    postprocessing : bool, default False
        True (the multicut) raises `NotSupportedError`.
    keys_store : zarr.Array or None, default None
        A uint64 zarr array, the volume's shape, chunks equal to `foreground`'s: each window task writes its
        core's keys there, so only small statistics travel back and the labels are read lazily from it
        (bounded memory for volumes larger than the cluster's memory). None: the keys are persisted in
        (distributed) memory.
    records : object or None, default None
        With `keys_store`: per-chunk done records for resuming (``load(index) -> dict or None`` and
        ``save(index, unique=, oversized=, skipped=)``, e.g. ``cryosiam_dask._resume.ChunkMarkers``).
        Chunks with a record are not segmented again; their statistics are read from the record.

    Returns
    -------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background, consecutive 1..N across the whole volume: the same partition as
        `instance_segmentation` on the whole volume (and the same ids, see the module notes).
    report : InstanceReport

    Notes
    -----
    The windows are segmented when this function is called (persisted on the cluster when a
    `distributed` client is active); `labels` is a lazy lookup of the stored keys.
    """
    if postprocessing:
        raise NotSupportedError(MULTICUT_MESSAGE)
    fg, dist = da.asarray(foreground), da.asarray(distance)
    if fg.ndim != 3 or fg.shape != dist.shape:
        raise ConfigError(f"foreground {fg.shape} and distance {dist.shape} must be 3-d arrays of one shape")
    for name, v in (("min_center_distance", threshold_min), ("max_center_distance", threshold_max)):
        if not np.isfinite(v):
            raise ConfigError(f"parameters.network.{name} must be a finite number, got {v!r}")
    halo3 = _halo3(halo)
    margin = margin_for(distance_type)
    for axis, (h, c) in enumerate(zip(halo3, fg.chunks, strict=True)):
        if len(c) > 1 and h <= margin:
            raise ConfigError(
                f"cryosiam_dask.halo is {h} along axis {'zyx'[axis]} but must exceed {margin} "
                f"(the reach of the smoothing and EDT) when that axis has several chunks"
            )
    dist = dist.rechunk(fg.chunks)
    shape: ShapeZYX = tuple(int(s) for s in fg.shape)  # type: ignore[assignment]
    params = dict(
        threshold_min=threshold_min,
        threshold_max=threshold_max,
        assignment_threshold=assignment_threshold,
        distance_type=distance_type,
    )
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in fg.chunks]
    grid = tuple(len(c) for c in fg.chunks)
    tasks = []
    stats_of: dict[tuple[int, ...], tuple[np.ndarray, int, bool]] = {}
    for index in product(*(range(n) for n in grid)):
        record = records.load(index) if records is not None and keys_store is not None else None
        if record is not None:
            stats_of[index] = (record["unique"], int(record["oversized"]), bool(record["skipped"]))
            continue
        lo = [int(bounds[a][i]) for a, i in enumerate(index)]
        hi = [int(bounds[a][i + 1]) for a, i in enumerate(index)]
        w0 = [max(0, lo[a] - halo3[a]) for a in range(3)]
        w1 = [min(shape[a], hi[a] + halo3[a]) for a in range(3)]
        window = tuple(slice(w0[a], w1[a]) for a in range(3))
        fn = _window_keys
        extra: dict[str, Any] = {}
        if keys_store is not None:
            fn = _window_keys_to_store
            region = tuple(slice(lo[a], hi[a]) for a in range(3))
            extra = {"store": keys_store, "region": region, "records": records, "index": index}
        tasks.append(
            dask.delayed(fn, pure=True)(
                fg[window],
                dist[window],
                **extra,
                start=tuple(w0),
                core=tuple(slice(lo[a] - w0[a], hi[a] - w0[a]) for a in range(3)),
                cut=tuple((w0[a] > 0, w1[a] < shape[a]) for a in range(3)),
                shape=shape,
                margin=margin,
                params=params,
            )
        )
    if keys_store is not None:
        todo = [i for i in product(*(range(n) for n in grid)) if i not in stats_of]
        stats_of.update((i, t[1:]) for i, t in zip(todo, dask.compute(*tasks), strict=True))
        if records is not None and len(stats_of) > len(todo):
            log.info("instances: %d of %d windows reused from an earlier run", len(stats_of) - len(todo),
                     len(stats_of))
        stats = [stats_of[i] for i in product(*(range(n) for n in grid))]
    else:
        tasks = list(dask.persist(*tasks))
        stats = dask.compute(*[dask.delayed(operator.itemgetter(1, 2, 3))(t) for t in tasks])
    table = np.unique(np.concatenate([s[0] for s in stats] + [np.zeros(0, np.uint64)]))
    n_skipped = sum(bool(s[2]) for s in stats)
    oversized = sum(int(s[1]) for s in stats)
    oversized_chunks = sum(int(s[1]) > 0 for s in stats)
    if oversized:
        log.warning(
            "%d component(s) in %d chunk(s) are larger than the halo %s allows: their labels come from "
            "single windows and may be split at chunk faces; use a larger halo",
            oversized,
            oversized_chunks,
            halo3,
        )
    if keys_store is not None:
        keys = da.from_zarr(keys_store, chunks=fg.chunks)
    else:
        meta = fg._meta.astype(np.uint64)
        blocks = np.empty(grid, dtype=object)
        for index, task in zip(product(*(range(n) for n in grid)), tasks, strict=True):
            core_shape = tuple(int(fg.chunks[a][i]) for a, i in enumerate(index))
            item = dask.delayed(operator.itemgetter(0))(task)
            blocks[index] = da.from_delayed(item, shape=core_shape, dtype=np.uint64, meta=meta)
        keys = da.block(blocks.tolist())
    labels = keys.map_blocks(_lookup, table, dtype=np.uint32, meta=fg._meta.astype(np.uint32))
    report = InstanceReport(
        n_instances=int(table.size),
        n_chunks=len(stats),
        n_skipped=n_skipped,
        oversized=oversized,
        oversized_chunks=oversized_chunks,
    )
    log.info("instances: %s", report)
    return labels, report
