"""CryoSiam's instances of a chunked volume, with global ids: the algorithm, written once.

Plan the windows -> window pass (:func:`~cryosiam_dask.instances.windows.segment_window`, one task per
chunk) -> link the chunks' support parts -> large-component pass
(:func:`~cryosiam_dask.instances.components.component_keys`, one task per component too large for the halo)
-> id table -> lookup of the ids.

Where the window and component keys live is a :class:`KeyStore`'s business:
:class:`~cryosiam_dask.instances.memory_store.MemoryKeyStore` keeps them on the cluster (the API's
:func:`~cryosiam_dask.instances.memory_store.segment_instances`), and
:class:`~cryosiam_dask.run.segment.ZarrKeyStore` writes them to zarr with done records so that a run resumes.
Both give the same labels.

Ids (:mod:`cryosiam_dask.instances.keys`): sorting the keys is CryoSiam's id order, so the ids 1..N equal the
original's whenever no marker lies wholly outside fg >= T (CryoSiam then leaves a gap in its ids; here they
stay consecutive). Oversized components (large ones whose crop exceeds one task's memory, `limit_bytes`) keep
their windows' flagged keys (their ids come after all exact ones) and are reported; a marker seen whole in two
windows keeps one id, otherwise such a component may be split at chunk faces.

With ``min_center_distance <= 0`` the support is the whole volume (the final distance is >= 0 everywhere): one
component, segmented whole when it fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.instances.components import (
    BYTES_PER_VOXEL,
    DEFAULT_LIMIT_BYTES,
    LargeComponent,
    Parts,
    limit_voxels,
    link_parts,
    plan_large,
)
from cryosiam_dask.instances.keys import FLAG, id_table, keys_to_ids
from cryosiam_dask.instances.params import PostParams
from cryosiam_dask.instances.windows import Window, plan_windows

__all__ = [
    "InstanceReport",
    "KeyStore",
    "Segmentation",
    "WindowRecord",
    "segment_chunked",
]

log = logging.getLogger(__name__)

Compute = Callable[..., tuple[Any, ...]]


@dataclass(frozen=True)
class WindowRecord:
    """What the client keeps of a segmented window: its distinct keys, whether it was empty, its parts."""

    unique: np.ndarray
    skipped: bool
    parts: Parts


@dataclass(frozen=True)
class InstanceReport:
    """What the chunked segmentation did.

    Attributes
    ----------
    n_instances : int
        Instances, ids 1..n_instances.
    n_chunks : int
        Chunks (= windows).
    n_skipped : int
        Windows without fg >= T: nothing was segmented there.
    large : int
        Components larger than the halo allows, segmented whole in one task each (exact).
    oversized : int
        Large components whose crop exceeds one task's memory: they keep their windows' labels.
    oversized_chunks : int
        Chunks touched by an oversized component.
    windows_computed, large_computed : int
        Windows and large components segmented by this call (the rest came from the store).
    """

    n_instances: int
    n_chunks: int
    n_skipped: int
    large: int
    oversized: int
    oversized_chunks: int
    windows_computed: int
    large_computed: int


@dataclass(frozen=True)
class Segmentation:
    """The result: lazy (Z, Y, X) uint32 labels, the id table (sorted uint64 keys) and the report."""

    labels: da.Array
    table: np.ndarray
    report: InstanceReport


class KeyStore(Protocol):
    """Where the window and large-component keys of one volume are computed and kept."""

    def window_pass(
        self, windows: list[Window], params: PostParams, compute: Compute
    ) -> tuple[list[WindowRecord], int]:
        """Segment the windows not yet done; every window's record, and how many were segmented now."""
        ...

    def large_pass(
        self, large: list[LargeComponent], params: PostParams, compute: Compute
    ) -> tuple[list[np.ndarray], int]:
        """Segment the (fitting) components not yet done; each one's distinct keys, and how many now."""
        ...

    def keys(self, windows: list[Window], large: list[LargeComponent]) -> da.Array:
        """The (Z, Y, X) uint64 keys: the windows' keys with the large components' laid over them."""
        ...


def plan_components(
    parts: list[Parts],
    windows: list[Window],
    chunks: tuple[tuple[int, ...], ...],
    margin: int,
    limit_bytes: int,
) -> tuple[list[LargeComponent], list[int]]:
    """The large components from the windows' parts, and per window the oversized ones touching its chunk."""
    shape = tuple(int(sum(c)) for c in chunks)
    if not any(bool(p.flagged.any()) for p in parts):
        return [], [0] * len(parts)
    component_of, n = link_parts(parts, windows, shape, chunks)  # type: ignore[arg-type]
    large, gids = plan_large(parts, component_of, n, shape, margin, limit_bytes)  # type: ignore[arg-type]
    over = np.zeros(n + 1, bool)
    over[[g for g, lc in zip(gids, large, strict=True) if lc.oversized]] = True
    return large, [int(np.unique(c[1:][over[c[1:]]]).size) for c in component_of]


def table_of(
    uniques: list[np.ndarray], large: list[LargeComponent], large_uniques: list[np.ndarray]
) -> np.ndarray:
    """The id table: the windows' exact keys, the keys of large components segmented whole, and the flagged
    window keys of the oversized ones."""
    exact = [np.asarray(u, np.uint64)[np.asarray(u, np.uint64) < FLAG] for u in uniques]
    flagged = [lc.flagged_keys for lc in large if lc.oversized]
    return id_table(exact + flagged + list(large_uniques))


def _report(
    records: list[WindowRecord],
    over: list[int],
    large: list[LargeComponent],
    table: np.ndarray,
    limit_bytes: int,
    computed: tuple[int, int],
) -> InstanceReport:
    oversized = [lc for lc in large if lc.oversized]
    if oversized:
        log.warning(
            "%d component(s) in %d chunk(s) are larger than one task may segment whole (a crop of %d voxels, "
            "%d bytes at %d bytes per voxel): their labels come from single windows and may be split at "
            "chunk faces; raise the memory limit or the halo",
            len(oversized),
            sum(n > 0 for n in over),
            limit_voxels(limit_bytes),
            limit_bytes,
            BYTES_PER_VOXEL,
        )
    report = InstanceReport(
        n_instances=int(table.size),
        n_chunks=len(records),
        n_skipped=sum(r.skipped for r in records),
        large=len(large) - len(oversized),
        oversized=len(oversized),
        oversized_chunks=sum(n > 0 for n in over),
        windows_computed=computed[0],
        large_computed=computed[1],
    )
    log.info("instances: %s", report)
    return report


def segment_chunked(
    chunks: tuple[tuple[int, ...], ...],
    params: PostParams,
    store: KeyStore,
    *,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
    compute: Compute = dask.compute,
) -> Segmentation:
    """CryoSiam's instances of a volume of `chunks`, with the same partition (and ids) as the whole volume.

    Parameters
    ----------
    chunks : dask chunks of the (Z, Y, X) maps
        One window per chunk (chunk + ``params.halo``, clipped to the volume).
    params : PostParams
    store : KeyStore
        Computes and keeps the keys (it holds the maps).
    limit_bytes : int, default 4 GiB
        Memory one large-component task may use; larger components are oversized.
    compute : callable, default dask.compute
        Runs the store's tasks (the run layer passes its tomogram's lane).
    """
    windows = plan_windows(chunks, params.halo, params.distance_type)
    records, n_windows = store.window_pass(windows, params, compute)
    large, over = plan_components([r.parts for r in records], windows, chunks, params.margin, limit_bytes)
    fitting = [lc for lc in large if not lc.oversized]
    large_uniques, n_large = store.large_pass(fitting, params, compute)
    table = table_of([r.unique for r in records], large, large_uniques)
    report = _report(records, over, large, table, limit_bytes, (n_windows, n_large))
    keys = store.keys(windows, fitting)
    labels = keys.map_blocks(keys_to_ids, table, dtype=np.uint32, meta=keys._meta.astype(np.uint32))
    return Segmentation(labels, table, report)
