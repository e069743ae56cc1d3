"""Stage 2, maps: the network per inference block into ``<work_dir>/<stem>/maps-<key>.zarr``, resumable.

Each inference block (:func:`~cryosiam_dask.network.predict.plan_inference`: a grid of the volume, not of the
storage chunks) is computed by one task that reads its own tomogram blocks from the zarr conversion, runs the
network and writes its maps into the store itself, then its done marker; only a small code comes back. So
every block runs once whatever the storage chunking, and nothing waits in worker memory between tasks. A
storage chunk that two blocks share is written under a file lock per chunk (zarr rewrites a whole chunk to
store part of it, :func:`write_region`); chunks inside one block need no lock.

The store is named by a hash of what the maps depend on (source file, checkpoint, normalisation, tiling
(for ``fast``, its window and margin), mask files, batch size, amp). CryoSiam's own ``<stem>_preds.h5`` of
the same settings in the prediction folder is reused instead of running the network, as the original does.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.io.sources import read_region, zarr_source
from cryosiam_dask.network.predict import InferenceBlock, plan_inference, run_block
from cryosiam_dask.outputs.cryosiam import read_raw_predictions
from cryosiam_dask.run import resume
from cryosiam_dask.run.inputs import OpenedInput
from cryosiam_dask.run.progress import DEFAULT_LANE, Lane
from cryosiam_dask.run.settings import InputSettings, NetworkSettings

logger = logging.getLogger(__name__)

__all__ = ["MAP_NAMES", "Maps", "maps_fingerprint", "predict_one", "write_region"]

MAP_NAMES = ("foreground", "distance", "boundary")


@dataclass(frozen=True)
class Maps:
    """The three maps of one tomogram, (Z, Y, X) float32 dask arrays read back from their store."""

    foreground: da.Array
    distance: da.Array
    boundary: da.Array
    key: str
    raw_reused: bool
    report: dict[str, Any]

    def arrays(self) -> tuple[da.Array, da.Array, da.Array]:
        """Foreground, distance, boundary."""
        return self.foreground, self.distance, self.boundary


def maps_fingerprint(item: OpenedInput, network: NetworkSettings, inputs: InputSettings) -> dict[str, Any]:
    """What the raw maps depend on (also stored with the raw maps h5, to recognise it on a rerun)."""
    st = network.checkpoint.stat()
    if isinstance(item.path, Path):
        src = item.path.stat()
        source = [str(item.path), src.st_size, src.st_mtime_ns]
    else:  # a URL or copick reference, read in place
        data = item.tomogram.data
        lamella = repr(getattr(item.path, "lamella", None))
        source = [item.path.name, list(data.shape), str(data.dtype), lamella]
    fp: dict[str, Any] = {
        "checkpoint": [str(network.checkpoint), st.st_size, st.st_mtime_ns],
        "data": list(network.data),
        "tiling": network.tiling,
        "source": source,
        "mask_folder": str(inputs.mask_folder) if inputs.mask_folder else None,
    }
    if network.tiling == "fast":  # its windows lie on a grid of the volume: the chunking is not a key
        fp["fast"] = [network.fast_window, network.fast_margin, "volume grid"]
    return fp


def _mask_stamp(item: OpenedInput, inputs: InputSettings) -> list[Any] | None:
    if inputs.mask_folder is None:
        return None
    return [resume.file_stamp(p) for p in sorted(inputs.mask_folder.glob(f"{item.stem}*")) if p.is_file()]


def _maps_key(item: OpenedInput, network: NetworkSettings, inputs: InputSettings, raw_reused: bool) -> str:
    return resume.fingerprint_key(
        maps_fingerprint(item, network, inputs),
        list(inputs.chunk_size),
        _mask_stamp(item, inputs),
        network.batch_size,
        network.amp,
        raw_reused,
    )


def write_region(values: np.ndarray, targets: list[Any], start: tuple[int, ...], locks: Path) -> None:
    """``targets[i][start:start + shape] = values[i]``, storage chunk by storage chunk.

    A chunk that the region covers only in part is written under the file lock ``<locks>/<chunk index>.lock``
    (zarr reads, updates and rewrites the whole chunk, and another task may be writing its other part). A
    file lock, not a ``distributed.Lock``: every one of those starts a lease-refresh callback in the worker
    that outlives it, and a tomogram has thousands of such chunks; the stores already need a shared file
    system.
    """
    from filelock import FileLock

    shape, chunks = targets[0].shape, targets[0].chunks
    stop = [a + n for a, n in zip(start, values.shape[1:], strict=True)]
    ranges = [range(a // c, -(-b // c)) for a, b, c in zip(start, stop, chunks, strict=True)]
    for index in itertools.product(*ranges):
        lo = [max(a, i * c) for a, i, c in zip(start, index, chunks, strict=True)]
        hi = [min(b, (i + 1) * c, n) for b, i, c, n in zip(stop, index, chunks, shape, strict=True)]
        whole = all(a == i * c and b == min((i + 1) * c, n)
                    for a, b, i, c, n in zip(lo, hi, index, chunks, shape, strict=True))
        dst = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        if not whole:
            locks.mkdir(parents=True, exist_ok=True)
        lock = nullcontext() if whole else FileLock(locks / f"{'.'.join(map(str, index))}.lock")
        with lock:
            for target, v in zip(targets, values, strict=True):
                target[dst] = v[src]


def _block_to_store(
    source: Any, mask: Any, *, reads: list[tuple[Any, tuple[int, ...]]], block: InferenceBlock,
    kwargs: dict[str, Any], targets: list[Any], markers: resume.ChunkMarkers, locks: Path,
) -> int:
    """One inference block: read its tomogram blocks, run the network, write the maps, then its marker.

    Returns 1 when the lamella mask skipped the block (nothing written: the store's fill value is 0), else 0.
    """
    if mask is not None:  # the lamella mask of the block, read here (see mask_reader)
        mask = np.asarray(mask[block.region])
    skipped = mask is not None and not np.any(mask)
    if not skipped:
        # from zarr, each read is a region; otherwise dask computed the tomogram block already
        blocks = [(read_region(source, r) if source is not None else r, offset) for r, offset in reads]
        write_region(run_block(blocks, mask, block=block, **kwargs), targets, block.start, locks)
    markers.save(block.index)
    return int(skipped)


def _store_dir(inputs: InputSettings, stem: str, key: str) -> Path:
    return inputs.work_dir / stem / f"maps-{key}.zarr"


def _block_tasks(item: OpenedInput, network: NetworkSettings, targets: list[Any], markers: Any,
                 key: str, inside: np.ndarray | None) -> tuple[list[Any], int, int]:
    """The write tasks of the inference blocks not yet done, the number of blocks, and how many of them lay
    wholly outside the lamella (`inside`: per storage chunk, any mask voxel; those get a marker, no task)."""
    data = item.tomogram.data
    p = plan_inference(data, network.checkpoint, mask=item.mask, **network.predict_kwargs())
    source = zarr_source(data)
    delayed_blocks = None if source is not None else data.to_delayed()
    edges = [np.cumsum((0,) + tuple(c)).tolist() for c in data.chunks]
    # one graph key for the mask reader: each task reads its own block of the mask, no pieces held in memory
    mask = None if item.mask_reader is None else dask.delayed(item.mask_reader, pure=True)
    task = dask.delayed(_block_to_store, pure=False)
    tasks, outside = [], 0
    for b in p.blocks:
        if markers.done(b.index):
            continue
        if inside is not None and not inside[_chunks_of(b, edges)].any():
            markers.save(b.index)  # wholly outside the lamella: its maps are the store's zeros
            outside += 1
            continue
        if source is not None:
            reads = [(tuple(slice(e[k], e[k + 1]) for e, k in zip(edges, j, strict=True)), off)
                     for j, off in b.reads]
        else:
            reads = [(delayed_blocks[j], off) for j, off in b.reads]
        name = f"network-{item.stem}-{key}-{'.'.join(map(str, b.index))}"
        tasks.append(task(source, mask, reads=reads, block=b,
                          kwargs=p.task_kwargs, targets=targets, markers=markers,
                          locks=markers.folder.parent / "locks", dask_key_name=name))
    return tasks, len(p.blocks), outside


def _chunks_of(block: InferenceBlock, edges: list[list[int]]) -> tuple[slice, ...]:
    """The storage chunks (index slices) that an inference block overlaps."""
    out = []
    for e, a, n in zip(edges, block.start, block.shape, strict=True):
        lo = int(np.searchsorted(e, a, side="right")) - 1
        hi = int(np.searchsorted(e, a + n, side="left"))
        out.append(slice(lo, hi))
    return tuple(out)


def _mask_inside(mask: da.Array | None, lane: Lane) -> np.ndarray | None:
    """Per storage chunk, whether the lamella mask has any voxel there (each mask chunk read once)."""
    if mask is None:
        return None
    flags = mask.map_blocks(lambda b: np.array(np.any(b)).reshape(1, 1, 1), chunks=(1, 1, 1), dtype=bool,
                            meta=np.empty((0, 0, 0), bool))
    return np.asarray(lane.compute(flags)[0])


def _reuse_raw(item: OpenedInput, network: NetworkSettings, inputs: InputSettings,
               prediction_folder: Path) -> Maps | None:
    """CryoSiam's ``<stem>_preds.h5`` of the same settings, as the original reuses it (or None)."""
    raw = prediction_folder / f"{item.stem}_preds.h5"
    if not raw.exists():
        return None
    fp = maps_fingerprint(item, network, inputs)
    reused = read_raw_predictions(raw, fp, shape=item.shape, chunks=inputs.chunk_size)
    if reused is None:
        return None
    logger.info("%s: reusing raw maps %s (network skipped, as CryoSiam does)", item.stem, raw.name)
    return Maps(*reused, key=_maps_key(item, network, inputs, True), raw_reused=True, report={})


def predict_one(
    item: OpenedInput, network: NetworkSettings, inputs: InputSettings, prediction_folder: Path,
    lane: Lane = DEFAULT_LANE,
) -> Maps:
    """The maps of one tomogram, each inference block computed and written once (resumable per block)."""
    key = _maps_key(item, network, inputs, False)
    store = _store_dir(inputs, item.stem, key)
    markers = resume.ChunkMarkers(store.with_name(store.name + ".done") / "maps", "maps")
    if not _complete(markers):
        reused = _reuse_raw(item, network, inputs, prediction_folder)
        if reused is not None:
            return reused
    chunks = tuple(int(c[0]) for c in item.tomogram.data.chunks)
    targets = [
        resume.open_chunked(store, name, shape=item.shape, chunks=chunks, dtype=np.float32, markers=markers)
        for name in MAP_NAMES
    ]
    # asked again: open_chunked clears the markers (and the flag) of a store it had to recreate
    inside = None if _complete(markers) else _mask_inside(item.mask, lane)
    tasks, n_blocks, outside = _block_tasks(item, network, targets, markers, key, inside)
    todo = len(tasks) + outside
    if todo < n_blocks:
        logger.info("%s: maps: %d of %d inference blocks done in an earlier run", item.stem,
                    n_blocks - todo, n_blocks)
    skipped = outside + sum(lane.compute(*tasks, network=True))
    report: dict[str, Any] = {"maps_blocks": n_blocks, "maps_blocks_computed": todo}
    if item.mask is not None and todo:
        report["blocks_skipped_outside_mask"] = skipped / todo
        logger.info("%s: %d of %d inference blocks lie outside the lamella and skipped the network",
                    item.stem, skipped, todo)
        if skipped == n_blocks:
            logger.warning("%s: the lamella mask is all zero: no instances will be found", item.stem)
    _mark_complete(markers, n_blocks)
    arrays = tuple(da.from_zarr(t, chunks=item.tomogram.data.chunks) for t in targets)
    return Maps(*arrays, key=key, raw_reused=False, report=report)


def _complete(markers: resume.ChunkMarkers) -> bool:
    """Every block of the store is done (the flag lives with the markers, so clearing them clears it)."""
    return (markers.folder / "complete").is_file()


def _mark_complete(markers: resume.ChunkMarkers, n_blocks: int) -> None:
    markers.folder.mkdir(parents=True, exist_ok=True)
    (markers.folder / "complete").write_text(str(n_blocks))
