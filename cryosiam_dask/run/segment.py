"""Stage 3, instances: the seeded watershed per chunk window, global ids, labels into zarr; resumable.

Each window task writes its core's marker keys into ``instances-<key>.zarr/keys`` (whole zarr chunks) and then
a done record with its small statistics and its support parts (:mod:`cryosiam_dask.instances.components`:
boxes, seeds, face planes), so only those travel back to the client and a rerun segments only unfinished
windows. The client links the parts into the support's global components; each component larger than the
halo allows (and within the memory limit of one task) is segmented whole by one task, which writes its crop's
keys to its own array ``large-<n>`` and then its record. The id table (sorted keys) is built from the
records; the labels are a lazy lookup of the stored keys (the large components' laid over the windows'),
written chunk by chunk to ``instances``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.backend import to_device, to_numpy
from cryosiam_dask.errors import InputFileError
from cryosiam_dask.instances.components import (
    DEFAULT_LIMIT_BYTES,
    LargeComponent,
    Parts,
    combine_keys,
    component_keys,
)
from cryosiam_dask.instances.merge import (
    InstanceReport,
    check_parameters,
    keys_to_ids,
    make_report,
    plan_components,
    table_of,
    window_parts,
)
from cryosiam_dask.instances.windows import Window, margin_for, plan_windows
from cryosiam_dask.io.sources import read_region, zarr_source
from cryosiam_dask.run import resume
from cryosiam_dask.run.maps import Maps, chunk_writes
from cryosiam_dask.run.progress import DEFAULT_LANE, Lane
from cryosiam_dask.run.settings import InstanceSettings

logger = logging.getLogger(__name__)

__all__ = ["Instances", "segment_all", "semantic_foreground"]


@dataclass
class Instances:
    """The instance labels of one tomogram: (Z, Y, X) uint32 dask array read from its store, and a report."""

    labels: da.Array
    report: dict[str, Any] = field(default_factory=dict)


def _read_semantic(path: str, labels: tuple[int, ...], block_info: Any = None) -> np.ndarray:
    import h5py

    loc = block_info[None]["array-location"]
    with h5py.File(path, "r") as f:
        block = f["labels"][tuple(slice(a, b) for a, b in loc)]
    return np.isin(block, labels).astype(np.float32)


def semantic_foreground(path: Path, labels: tuple[int, ...], like: da.Array) -> da.Array:
    """fg = ``isin(semantic labels, labels)`` as float32, read chunk by chunk from ``path['labels']``.

    Raises
    ------
    InputFileError
        The file is missing or its labels are not of `like`'s shape.
    """
    import h5py

    if not path.exists():
        raise InputFileError(f"semantic prediction {path} does not exist")
    with h5py.File(path, "r") as f:
        shape = tuple(f["labels"].shape)
    if shape != tuple(like.shape):
        raise InputFileError(
            f"semantic prediction {path.name} is {shape} but tomogram is {tuple(like.shape)}"
        )
    return da.map_blocks(
        _read_semantic,
        str(path),
        tuple(labels),
        chunks=like.chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


def _sources(fg: da.Array, dist: da.Array) -> tuple[Any, Any] | None:
    sources = zarr_source(fg), zarr_source(dist)
    return None if sources[0] is None or sources[1] is None else sources


def _keys_to_store(
    fg: Any,
    dist: Any,
    *,
    store: Any,
    region: tuple[slice, ...],
    records: Any,
    index: tuple[int, ...],
    window: tuple[slice, ...],
    device: str = "cpu",
    **kwargs: Any,
) -> int:
    """:func:`window_parts` of one window, its core's keys written to ``store[region]``, then its record.

    `fg` and `dist` are the window's maps, or the zarr arrays of the maps (the window is read here).
    With ``device="cuda"`` the window is copied to the worker's GPU once and every step runs there
    (the watershed itself on the host, see :mod:`cryosiam_dask.instances.watershed`); only the keys and the
    small statistics come back.
    """
    fg, dist = to_device(read_region(fg, window), device), to_device(read_region(dist, window), device)
    keys, unique, n_oversized, skipped, parts = window_parts(fg, dist, **kwargs)
    store[region] = to_numpy(keys)
    records.save(index, unique=unique, oversized=n_oversized, skipped=skipped, **parts.to_arrays())
    return 1


def _large_to_store(
    fg: Any, dist: Any, *, target: Any, records: Any, n: int, device: str = "cpu", **kwargs: Any
) -> int:
    """:func:`component_keys` of one large component written to `target` (its own array), then its record.

    `fg` and `dist` are the maps on the crop, or the zarr arrays of the maps (the crop is read here).
    """
    crop = kwargs["crop"]
    fg, dist = to_device(read_region(fg, crop), device), to_device(read_region(dist, crop), device)
    keys, unique = component_keys(fg, dist, **kwargs)
    target[...] = to_numpy(keys)
    crop = np.array([[s.start, s.stop] for s in kwargs["crop"]])
    records.save((n,), unique=unique, seed=np.asarray(kwargs["seed"]), crop=crop)
    return 1


def _record_matches(record: dict[str, np.ndarray] | None, lc: LargeComponent) -> bool:
    if record is None:
        return False
    crop = np.array([[s.start, s.stop] for s in lc.crop])
    return bool(np.array_equal(record["seed"], lc.seed) and np.array_equal(record["crop"], crop))


def _labels_block(keys: Any, table: np.ndarray, pieces: list[Any], block_info: Any = None) -> Any:
    """One chunk's ids: the large components' keys laid over the windows' keys, looked up in the table."""
    region = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    return keys_to_ids(combine_keys(keys, region, pieces), table)


def _segment_large(
    large: list[LargeComponent],
    fg: da.Array,
    dist: da.Array,
    store: Path,
    done: Path,
    chunks: tuple[int, ...],
    params: dict[str, Any],
    device: str = "cpu",
    lane: Lane = DEFAULT_LANE,
) -> tuple[list[tuple[Any, tuple[slice, ...]]], list[np.ndarray], int]:
    """Segment the fitting large components (one task each, resumable); their (array, crop) and keys."""
    shape = tuple(int(s) for s in fg.shape)
    sources = _sources(fg, dist)
    pieces, uniques, tasks, todo = [], [], [], []
    task = dask.delayed(_large_to_store, pure=True)
    for n, lc in enumerate(c for c in large if c.fits):
        crop_shape = tuple(s.stop - s.start for s in lc.crop)
        records = resume.ChunkMarkers(done / "large" / str(n), "large")
        target = resume.open_chunked(
            store,
            f"large-{n}",
            shape=crop_shape,
            chunks=tuple(min(c, s) for c, s in zip(chunks, crop_shape, strict=True)),
            dtype=np.uint64,
            markers=records,
        )
        pieces.append((target, lc.crop))
        record = records.load((n,))
        if _record_matches(record, lc):
            uniques.append(record["unique"])  # type: ignore[index]
            continue
        todo.append((n, records))
        uniques.append(None)
        kw = dict(crop=lc.crop, seed=lc.seed, shape=shape, params=params, device=device)
        maps = sources or (fg[lc.crop], dist[lc.crop])
        tasks.append(task(*maps, target=target, records=records, n=n, **kw))
    lane.compute(*tasks)
    for n, records in todo:
        uniques[n] = records.load((n,))["unique"]  # type: ignore[index]
    return pieces, uniques, len(todo)  # type: ignore[return-value]


def task_memory_limit() -> int:
    """Bytes one large-component task may use: half the smallest worker's memory limit per thread.

    Read from the active ``distributed`` client (the cluster's ``memory_limit``; half, because dask pauses
    a worker at 80 % and the worker holds other results too). Without a client, or with unlimited workers,
    `DEFAULT_LIMIT_BYTES` (4 GiB: components whose box + margin exceeds ~27 million voxels keep the
    windows' labels). With the default settings on a 64 GiB, 16-core machine (8 workers of 2 threads,
    8 GiB each) that is 2 GiB, ~13 million voxels, e.g. a 237^3 box.
    """
    try:
        from distributed import get_client

        workers = get_client().scheduler_info(n_workers=-1)["workers"].values()
    except (ImportError, ValueError, TypeError):
        return DEFAULT_LIMIT_BYTES
    per_thread = [
        int(w.get("memory_limit") or 0) // max(1, int(w.get("nthreads") or 1)) // 2 for w in workers
    ]
    per_thread = [v for v in per_thread if v > 0]
    return min(per_thread) if per_thread else DEFAULT_LIMIT_BYTES


def _check_table(done: Path, table: np.ndarray, label_markers: Any) -> None:
    """Clear the label chunks' markers when the id table differs from the one they were written with (a
    rerun under another memory limit may segment other components whole)."""
    stamp = done / "instances-table.txt"
    token = dask.base.tokenize(table)
    if stamp.is_file() and stamp.read_text() == token:
        return
    label_markers.clear()
    done.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(token)
    tmp.replace(stamp)


def _instances_key(maps_key: str, settings: InstanceSettings, semantic: Any) -> str:
    return resume.fingerprint_key(
        maps_key,
        [
            settings.threshold_foreground,
            settings.min_center_distance,
            settings.max_center_distance,
            settings.distance_type,
        ],
        settings.halo,
        semantic,
        "components-1",  # records carry the support parts
    )


def _segment_one(
    stem: str, maps: Maps, settings: InstanceSettings, work_dir: Path, lane: Lane = DEFAULT_LANE
) -> tuple[Any, ...]:
    """Window keys of one tomogram into its store; returns (labels, report, target array, markers)."""
    fg, dist = maps.foreground, maps.distance
    semantic = None
    if settings.semantic_predictions is not None:
        path = settings.semantic_predictions / f"{stem}_preds.h5"
        fg = semantic_foreground(path, settings.semantic_foreground_labels or (), fg)
        semantic = [resume.file_stamp(path), list(settings.semantic_foreground_labels or ())]
    check_parameters(settings.min_center_distance, settings.max_center_distance)
    windows: list[Window] = plan_windows(fg.chunks, settings.halo, settings.distance_type)
    chunks = tuple(int(c[0]) for c in fg.chunks)
    store = work_dir / stem / f"instances-{_instances_key(maps.key, settings, semantic)}.zarr"
    done = store.with_name(store.name + ".done")
    records = resume.ChunkMarkers(done / "windows", "windows")
    keys = resume.open_chunked(store, "keys", shape=fg.shape, chunks=chunks, dtype=np.uint64, markers=records)
    shape = tuple(int(s) for s in fg.shape)
    params = settings.watershed_kwargs()
    stats_of: dict[tuple[int, ...], tuple[np.ndarray, bool, Parts]] = {}
    tasks, todo = [], []
    task = dask.delayed(_keys_to_store, pure=True)
    sources = _sources(fg, dist)  # zarr-backed maps: each window task reads its own window
    for w in windows:
        record = records.load(w.index)
        if record is not None:
            stats_of[w.index] = (record["unique"], bool(record["skipped"]), Parts.from_arrays(record))
            continue
        todo.append(w.index)
        tasks.append(
            task(
                *(sources or (fg[w.window], dist[w.window])),
                store=keys,
                region=w.region,
                window=w.window,
                records=records,
                index=w.index,
                start=w.start,
                core=w.core,
                cut=w.cut,
                shape=shape,
                margin=margin_for(settings.distance_type),
                params=params,
                device=settings.device,
                dask_key_name=f"windows-{stem}-{store.stem}-{'.'.join(map(str, w.index))}",
            )
        )
    if stats_of:
        logger.info("instances: %d of %d windows reused from an earlier run", len(stats_of), len(windows))
    lane.compute(*tasks)
    for index in todo:
        record = records.load(index)
        stats_of[index] = (record["unique"], bool(record["skipped"]), Parts.from_arrays(record))  # type: ignore[index]
    stats = [stats_of[w.index] for w in windows]
    limit = task_memory_limit()
    large, over = plan_components([s[2] for s in stats], windows, fg.chunks, settings.distance_type, limit)
    pieces, luniques, n_large = _segment_large(
        large, fg, dist, store, done, chunks, params, settings.device, lane
    )
    table = table_of([s[0] for s in stats], large, luniques)
    report: InstanceReport = make_report([s[1] for s in stats], over, large, table, limit)
    label_markers = resume.ChunkMarkers(done / "instances", "instances")
    _check_table(done, table, label_markers)
    labels = da.from_zarr(keys, chunks=fg.chunks).map_blocks(
        _labels_block, table, pieces, dtype=np.uint32, meta=np.empty((0, 0, 0), np.uint32)
    )
    target = resume.open_chunked(
        store, "instances", shape=fg.shape, chunks=chunks, dtype=np.uint32, markers=label_markers
    )
    extra = {"windows_computed": len(todo), "large_computed": n_large, "store": store.name, **asdict(report)}
    return labels, extra, target, label_markers


def segment_all(
    stems: list[str], maps: list[Maps], settings: InstanceSettings, work_dir: Path, lane: Lane = DEFAULT_LANE
) -> list[Instances]:
    """Instances of every tomogram; the windows of all tomograms share the cluster."""
    with ThreadPoolExecutor(max_workers=max(1, len(stems))) as pool:  # one submitting thread per tomogram
        pairs = zip(stems, maps, strict=True)
        done = list(pool.map(lambda a: _segment_one(a[0], a[1], settings, work_dir, lane), pairs))
    writes, out = [], []
    for stem, (labels, report, target, markers) in zip(stems, done, strict=True):
        todo = [i for i in np.ndindex(*labels.numblocks) if not markers.done(i)]
        report["label_chunks_computed"] = len(todo)
        n_all = int(np.prod(labels.numblocks))
        if len(todo) < n_all:
            logger.info("%s: labels: %d of %d chunks done in an earlier run", stem, n_all - len(todo), n_all)
        writes += chunk_writes([labels], [target], markers, todo, name=f"labels-{stem}-{target.path}")
        out.append(Instances(da.from_zarr(target, chunks=labels.chunks), report))
    lane.compute(*writes)
    return out
