"""Stage 3, instances: the chunked segmentation of :mod:`cryosiam_dask.instances.chunked` on a zarr store.

:class:`ZarrKeyStore` keeps the keys in ``<work_dir>/<stem>/instances-<key>.zarr``: each window task reads its
window from the maps store, writes its chunk's keys (whole zarr chunks) and then a done record with its small
statistics and support parts, so only those travel back to the client and a rerun segments only unfinished
windows; each large component's task writes its crop's keys to its own array ``large-<n>`` and then its
record. The labels (a lazy lookup of the stored keys) are then written chunk by chunk to ``instances``,
resumable too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.backend import to_device, to_numpy
from cryosiam_dask.instances.chunked import Compute, WindowRecord, segment_chunked
from cryosiam_dask.instances.components import DEFAULT_LIMIT_BYTES, LargeComponent, Parts, component_keys
from cryosiam_dask.instances.keys import combine_keys
from cryosiam_dask.instances.params import PostParams
from cryosiam_dask.instances.windows import Window, segment_window
from cryosiam_dask.io.semantic import semantic_foreground
from cryosiam_dask.io.sources import read_region, zarr_source
from cryosiam_dask.run import resume
from cryosiam_dask.run.maps import Maps
from cryosiam_dask.run.progress import DEFAULT_LANE, Lane
from cryosiam_dask.run.settings import InstanceSettings

logger = logging.getLogger(__name__)

__all__ = ["Instances", "ZarrKeyStore", "segment_one", "task_memory_limit"]

RECORD_FORMAT = "keys-2"
"""Version of the done records (part of the store's key: a changed format never reuses old records)."""


@dataclass
class Instances:
    """The instance labels of one tomogram: (Z, Y, X) uint32 dask array read from its store, and a report."""

    labels: da.Array
    report: dict[str, Any] = field(default_factory=dict)
    store: str = ""
    """The name of the keys store the labels came from (the multicut's store key depends on it)."""


def _window_to_store(
    fg: Any,
    dist: Any,
    *,
    keys: Any,
    records: Any,
    window: Window,
    shape: Any,
    params: PostParams,
    device: str = "cpu",
) -> int:
    """One window segmented (on `device`), its chunk's keys written to ``keys[region]``, then its record."""
    w = window
    fg, dist = to_device(read_region(fg, w.window), device), to_device(read_region(dist, w.window), device)
    out = segment_window(fg, dist, start=w.start, core=w.core, cut=w.cut, shape=shape, params=params)
    keys[w.region] = to_numpy(out.keys)
    records.save(w.index, unique=out.unique, skipped=out.skipped, **out.parts.to_arrays())
    return 1


def _large_to_store(
    fg: Any,
    dist: Any,
    *,
    target: Any,
    records: Any,
    n: int,
    component: LargeComponent,
    shape: Any,
    params: PostParams,
    device: str = "cpu",
) -> int:
    """One large component segmented whole, its crop's keys written to `target`, then its record."""
    crop = component.crop
    fg, dist = to_device(read_region(fg, crop), device), to_device(read_region(dist, crop), device)
    keys, unique = component_keys(fg, dist, crop=crop, seed=component.seed, shape=shape, params=params)
    target[...] = to_numpy(keys)
    records.save((n,), unique=unique, seed=np.asarray(component.seed), crop=_crop_array(crop))
    return 1


def _crop_array(crop: tuple[slice, ...]) -> np.ndarray:
    return np.array([[s.start, s.stop] for s in crop])


def _combine_block(keys: Any, pieces: list[Any], block_info: Any = None) -> Any:
    region = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    return combine_keys(keys, region, pieces)


class ZarrKeyStore:
    """Keys in a zarr store with a done record per window and per large component (resumable).

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask.array.Array of float32
        The maps; read by each task itself when they are stored zarr arrays.
    store : Path
        ``instances-<key>.zarr``; the records go to ``<store>.done``.
    name : str
        Task name prefix (the tomogram's stem).
    device : {"cpu", "cuda"}
        Where each window is segmented.
    """

    def __init__(self, foreground: da.Array, distance: da.Array, store: Path, name: str, device: str) -> None:
        self.fg, self.dist, self.store, self.name, self.device = foreground, distance, store, name, device
        sources = zarr_source(foreground), zarr_source(distance)
        self.sources = None if None in sources else sources
        self.done = store.with_name(store.name + ".done")
        self.records = resume.ChunkMarkers(self.done / "windows", "windows")
        self.shape = tuple(int(s) for s in foreground.shape)
        self.chunks = tuple(int(c[0]) for c in foreground.chunks)
        self.key_array = resume.open_chunked(
            store, "keys", shape=self.shape, chunks=self.chunks, dtype=np.uint64, markers=self.records
        )
        self.pieces: list[tuple[Any, tuple[slice, ...]]] = []

    def _maps(self, region: tuple[slice, ...]) -> tuple[Any, Any]:
        return self.sources or (self.fg[region], self.dist[region])

    def window_pass(
        self, windows: list[Window], params: PostParams, compute: Compute
    ) -> tuple[list[WindowRecord], int]:
        """See :meth:`~cryosiam_dask.instances.chunked.KeyStore.window_pass` (done windows reused)."""
        task = dask.delayed(_window_to_store, pure=False)
        todo = [w for w in windows if not self.records.done(w.index)]
        if len(todo) < len(windows):
            logger.info(
                "instances: %d of %d windows reused from an earlier run",
                len(windows) - len(todo),
                len(windows),
            )
        compute(
            *[
                task(
                    *self._maps(w.window),
                    keys=self.key_array,
                    records=self.records,
                    window=w,
                    shape=self.shape,
                    params=params,
                    device=self.device,
                    dask_key_name=f"windows-{self.name}-{self.store.stem}-{'.'.join(map(str, w.index))}",
                )
                for w in todo
            ]
        )
        out = []
        for w in windows:
            r = self.records.load(w.index)
            out.append(WindowRecord(r["unique"], bool(r["skipped"]), Parts.from_arrays(r)))  # type: ignore[index]
        return out, len(todo)

    def large_pass(
        self, large: list[LargeComponent], params: PostParams, compute: Compute
    ) -> tuple[list[np.ndarray], int]:
        """See :meth:`~cryosiam_dask.instances.chunked.KeyStore.large_pass` (done components reused)."""
        task = dask.delayed(_large_to_store, pure=False)
        tasks, records = [], []
        self.pieces = []
        for n, lc in enumerate(large):
            rec = resume.ChunkMarkers(self.done / "large" / str(n), "large")
            crop_shape = tuple(s.stop - s.start for s in lc.crop)
            target = resume.open_chunked(
                self.store,
                f"large-{n}",
                shape=crop_shape,
                dtype=np.uint64,
                markers=rec,
                chunks=tuple(min(c, s) for c, s in zip(self.chunks, crop_shape, strict=True)),
            )
            self.pieces.append((target, lc.crop))
            records.append(rec)
            if not _record_matches(rec.load((n,)), lc):
                tasks.append(
                    task(
                        *self._maps(lc.crop),
                        target=target,
                        records=rec,
                        n=n,
                        component=lc,
                        shape=self.shape,
                        params=params,
                        device=self.device,
                        dask_key_name=f"large-{self.name}-{self.store.stem}-{n}",
                    )
                )
        compute(*tasks)
        return [rec.load((n,))["unique"] for n, rec in enumerate(records)], len(tasks)  # type: ignore[index]

    def keys(self, windows: list[Window], large: list[LargeComponent]) -> da.Array:
        """See :meth:`~cryosiam_dask.instances.chunked.KeyStore.keys` (read from the store)."""
        keys = da.from_zarr(self.key_array, chunks=self.fg.chunks)
        if not self.pieces:
            return keys
        return keys.map_blocks(
            _combine_block, self.pieces, dtype=np.uint64, meta=np.empty((0, 0, 0), np.uint64)
        )


def _record_matches(record: dict[str, np.ndarray] | None, lc: LargeComponent) -> bool:
    if record is None:
        return False
    return bool(
        np.array_equal(record["seed"], lc.seed) and np.array_equal(record["crop"], _crop_array(lc.crop))
    )


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
    p = settings.post
    return resume.fingerprint_key(
        maps_key,
        [p.threshold_foreground, p.min_center_distance, p.max_center_distance, p.distance_type],
        p.halo,
        semantic,
        RECORD_FORMAT,
    )


def segment_one(
    stem: str, maps: Maps, settings: InstanceSettings, work_dir: Path, lane: Lane = DEFAULT_LANE
) -> Instances:
    """The instances of one tomogram: keys into its store, then its labels written chunk by chunk."""
    fg, dist = maps.foreground, maps.distance
    semantic = None
    if settings.semantic_predictions is not None:
        path = settings.semantic_predictions / f"{stem}_preds.h5"
        fg = semantic_foreground(path, settings.semantic_foreground_labels or (), fg)
        semantic = [resume.file_stamp(path), list(settings.semantic_foreground_labels or ())]
    store = work_dir / stem / f"instances-{_instances_key(maps.key, settings, semantic)}.zarr"
    keys = ZarrKeyStore(fg, dist, store, stem, settings.device)
    result = segment_chunked(
        fg.chunks, settings.post, keys, limit_bytes=task_memory_limit(), compute=lane.compute
    )
    label_markers = resume.ChunkMarkers(keys.done / "instances", "instances")
    _check_table(keys.done, result.table, label_markers)
    target, n_written = resume.store_chunks(result.labels, store, "instances", label_markers, stem=stem,
                                            kind="labels", compute=lane.compute)
    report = {**asdict(result.report), "label_chunks_computed": n_written}
    return Instances(da.from_zarr(target, chunks=result.labels.chunks), report, store.name)
