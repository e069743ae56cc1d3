"""Stage 3b, multicut (``postprocessing: True``): the watershed labels joined by CryoSiam's multicut.

The edge statistics are computed per chunk from the stored watershed labels and the maps store's boundary
map, the graph is solved on the client (:func:`~cryosiam_dask.instances.multicut.multicut_chunked`), and the
relabelled volume is written chunk by chunk to ``multicut-<key>.zarr`` with done markers. A resumed run
recomputes the (small) graph and rewrites only unfinished chunks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da

from cryosiam_dask.instances.multicut import multicut_chunked
from cryosiam_dask.run import resume
from cryosiam_dask.run.maps import Maps
from cryosiam_dask.run.progress import DEFAULT_LANE, Lane
from cryosiam_dask.run.segment import Instances
from cryosiam_dask.run.settings import InstanceSettings

logger = logging.getLogger(__name__)

__all__ = ["multicut_one"]


def multicut_one(
    stem: str,
    maps: Maps,
    inst: Instances,
    settings: InstanceSettings,
    work_dir: Path,
    lane: Lane = DEFAULT_LANE,
) -> Instances:
    """The multicut of one tomogram's watershed labels (unchanged when it is off)."""
    post = settings.post
    if not post.multicut_on:
        return inst
    labels, n = multicut_chunked(
        inst.labels, maps.boundary, boundary_bias=post.boundary_bias, compute=lane.compute
    )
    key = resume.fingerprint_key(inst.store, post.boundary_bias, n)
    store = work_dir / stem / f"multicut-{key}.zarr"
    markers = resume.ChunkMarkers(store.with_name(store.name + ".done") / "multicut", "multicut")
    target, _ = resume.store_chunks(labels, store, "instances", markers, stem=stem, kind="multicut",
                                    compute=lane.compute)
    n_before = inst.report.get("n_instances", 0)
    logger.info("%s: multicut joined %d watershed instances into %d", stem, n_before, n)
    report = {**inst.report, "n_watershed_instances": n_before, "n_instances": n}
    return Instances(da.from_zarr(target, chunks=labels.chunks), report, store.name)
