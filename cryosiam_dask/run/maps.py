"""Stage 2, maps: the network per chunk into ``<work_dir>/<stem>/maps-<key>.zarr``, resumable per chunk.

The store is named by a hash of what the maps depend on (source file, checkpoint, normalisation, tiling
(for ``fast``, its window and margin), mask files, batch size, amp). CryoSiam's own ``<stem>_preds.h5`` of
the same settings in the prediction folder is reused instead of running the network, as the original does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.network.predict import predict_maps, skipped_fraction
from cryosiam_dask.outputs.cryosiam import read_raw_predictions
from cryosiam_dask.run import resume
from cryosiam_dask.run.inputs import OpenedInput
from cryosiam_dask.run.progress import compute
from cryosiam_dask.run.settings import InputSettings, NetworkSettings

logger = logging.getLogger(__name__)

__all__ = ["MAP_NAMES", "Maps", "chunk_writes", "maps_fingerprint", "predict_all"]

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
        return self.foreground, self.distance, self.boundary


def maps_fingerprint(item: OpenedInput, network: NetworkSettings, inputs: InputSettings) -> dict[str, Any]:
    """What the raw maps depend on (also stored with the raw maps h5, to recognise it on a rerun)."""
    st = network.checkpoint.stat()
    src = item.path.stat()
    fp: dict[str, Any] = {
        "checkpoint": [str(network.checkpoint), st.st_size, st.st_mtime_ns],
        "data": list(network.data),
        "tiling": network.tiling,
        "source": [str(item.path), src.st_size, src.st_mtime_ns],
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


def chunk_writes(arrays: Any, targets: list[Any], markers: Any, todo: list[tuple[int, ...]]) -> list[Any]:
    """One delayed task per chunk in ``todo``: write that chunk of every array, then the chunk's marker."""
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in arrays[0].chunks]
    write = dask.delayed(resume.write_chunk, pure=False)
    tasks = []
    for index in todo:
        region = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, index, strict=True))
        tasks.append(write([a.blocks[index] for a in arrays], targets, region, markers, index))
    return tasks


def _store_dir(inputs: InputSettings, stem: str, key: str) -> Path:
    return inputs.work_dir / stem / f"maps-{key}.zarr"


def predict_all(
    items: list[OpenedInput], network: NetworkSettings, inputs: InputSettings, prediction_folder: Path
) -> list[Maps]:
    """The maps of every tomogram; the chunks of all tomograms are computed together."""
    writes, out = [], []
    for item in items:
        report: dict[str, Any] = {}
        raw = prediction_folder / f"{item.stem}_preds.h5"
        key = _maps_key(item, network, inputs, False)
        store = _store_dir(inputs, item.stem, key)
        markers = resume.ChunkMarkers(store.with_name(store.name + ".done") / "maps", "maps")
        blocks = list(np.ndindex(*item.tomogram.data.numblocks))
        todo = [i for i in blocks if not markers.done(i)]
        if todo and raw.exists():  # a complete maps store of this run's settings wins over the raw h5
            fp = maps_fingerprint(item, network, inputs)
            reused = read_raw_predictions(raw, fp, shape=item.shape, chunks=inputs.chunk_size)
            if reused is not None:
                logger.info(
                    "%s: reusing raw maps %s (network skipped, as CryoSiam does)", item.stem, raw.name
                )
                out.append(
                    Maps(*reused, key=_maps_key(item, network, inputs, True), raw_reused=True, report=report)
                )
                continue
        if item.mask is not None:
            frac = skipped_fraction(item.mask, item.tomogram.data.chunks)
            report["chunks_skipped_outside_mask"] = frac
            logger.info(
                "%s: %.0f%% of chunks lie outside the lamella and skip the network", item.stem, 100 * frac
            )
            if frac == 1.0:
                logger.warning("%s: the lamella mask is all zero: no instances will be found", item.stem)
        chunks = tuple(int(c[0]) for c in item.tomogram.data.chunks)
        targets = [
            resume.open_chunked(
                store, name, shape=item.shape, chunks=chunks, dtype=np.float32, markers=markers
            )
            for name in MAP_NAMES
        ]
        arrays = tuple(da.from_zarr(t, chunks=item.tomogram.data.chunks) for t in targets)
        todo = [i for i in blocks if not markers.done(i)]  # open_chunked clears the markers of a new store
        report["maps_chunks_computed"] = len(todo)
        if len(todo) < len(blocks):
            logger.info(
                "%s: maps: %d of %d chunks done in an earlier run",
                item.stem,
                len(blocks) - len(todo),
                len(blocks),
            )
        out.append(Maps(*arrays, key=key, raw_reused=False, report=report))
        if todo:
            maps = predict_maps(
                item.tomogram.data, network.checkpoint, mask=item.mask, **network.predict_kwargs()
            )
            writes += chunk_writes(maps, targets, markers, todo)
    if writes:
        compute(*writes)
    return out
