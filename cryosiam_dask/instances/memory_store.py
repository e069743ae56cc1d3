"""The chunked segmentation with its keys kept on the cluster: :func:`segment_instances` (the API's path).

:class:`MemoryKeyStore` persists each window's and each large component's task on the cluster (or in this
process without a ``distributed`` client); only the small records come back to the client. For volumes larger
than the cluster's memory the run layer's :class:`~cryosiam_dask.run.segment.ZarrKeyStore` writes the keys
to zarr instead.
"""

from __future__ import annotations

import operator
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.chunked import Compute, InstanceReport, WindowRecord, segment_chunked
from cryosiam_dask.instances.components import DEFAULT_LIMIT_BYTES, LargeComponent, component_keys
from cryosiam_dask.instances.keys import combine_keys
from cryosiam_dask.instances.params import PostParams
from cryosiam_dask.instances.windows import Window, segment_window

__all__ = ["MemoryKeyStore", "segment_instances"]


def _record(result: Any) -> WindowRecord:
    return WindowRecord(result.unique, result.skipped, result.parts)


def _keys_of(result: Any) -> Any:
    return result.keys


def _combine(keys: Any, region: tuple[slice, ...], crops: list[Any], *arrays: Any) -> Any:
    return combine_keys(keys, region, list(zip(arrays, crops, strict=True)))


def _persisted(fn: Any, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], store: Any,
               params: PostParams) -> list[Any]:
    """One persisted task of `fn` per ``((region,), kwargs)``: the maps on the region, the volume's shape."""
    task = dask.delayed(fn, pure=True)
    return list(dask.persist(*[
        task(store.fg[region], store.dist[region], shape=store.shape, params=params, **kw)
        for (region,), kw in calls
    ]))


class MemoryKeyStore:
    """Keys persisted on the cluster: one task per window and per large component, no files.

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask.array.Array of float32
        The maps, chunked alike (numpy or cupy chunks).
    """

    def __init__(self, foreground: da.Array, distance: da.Array) -> None:
        self.fg, self.dist = foreground, distance
        self.shape = tuple(int(s) for s in foreground.shape)
        self._windows: list[Any] = []
        self._large: list[Any] = []

    def window_pass(
        self, windows: list[Window], params: PostParams, compute: Compute
    ) -> tuple[list[WindowRecord], int]:
        """See :meth:`~cryosiam_dask.instances.chunked.KeyStore.window_pass` (every window, persisted)."""
        self._windows = _persisted(
            segment_window,
            [((w.window,), dict(start=w.start, core=w.core, cut=w.cut)) for w in windows],
            self, params,
        )
        records = compute(*[dask.delayed(_record)(t) for t in self._windows])
        return list(records), len(windows)

    def large_pass(
        self, large: list[LargeComponent], params: PostParams, compute: Compute
    ) -> tuple[list[np.ndarray], int]:
        """See :meth:`~cryosiam_dask.instances.chunked.KeyStore.large_pass` (every component, persisted)."""
        self._large = _persisted(
            component_keys, [((lc.crop,), dict(crop=lc.crop, seed=lc.seed)) for lc in large], self, params
        )
        uniques = compute(*[dask.delayed(operator.itemgetter(1))(t) for t in self._large])
        return list(uniques), len(large)

    def keys(self, windows: list[Window], large: list[LargeComponent]) -> da.Array:
        """See :meth:`~cryosiam_dask.instances.chunked.KeyStore.keys`."""
        arrays = [dask.delayed(operator.itemgetter(0))(t) for t in self._large]
        meta = self.fg._meta.astype(np.uint64)
        blocks = np.empty(self.fg.numblocks, dtype=object)
        for w, t in zip(windows, self._windows, strict=True):
            item = dask.delayed(_keys_of)(t)
            touching = [
                (a, lc.crop)
                for lc, a in zip(large, arrays, strict=True)
                if all(c.start < r.stop and r.start < c.stop for c, r in zip(lc.crop, w.region, strict=True))
            ]
            if touching:
                crops = [c for _, c in touching]
                item = dask.delayed(_combine, pure=True)(item, w.region, crops, *[a for a, _ in touching])
            shape = tuple(s.stop - s.start for s in w.region)
            blocks[w.index] = da.from_delayed(item, shape=shape, dtype=np.uint64, meta=meta)
        return da.block(blocks.tolist())


def segment_instances(
    foreground: Any, distance: Any, params: PostParams, *, limit_bytes: int = DEFAULT_LIMIT_BYTES
) -> tuple[da.Array, InstanceReport]:
    """CryoSiam's instances of a chunked volume, with ids unique across it (the keys kept on the cluster).

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask.array.Array of float32
        The network maps (after the lamella mask); numpy or cupy chunks. `distance` is rechunked like
        `foreground`.
    params : PostParams
        The post-processing, with the halo read around each chunk.
    limit_bytes : int, default 4 GiB
        Memory one large-component task may use; larger components keep their windows' labels.

    Returns
    -------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background, consecutive 1..N across the volume: the same partition as
        :func:`~cryosiam_dask.instances.reference.instance_segmentation` on the whole volume (and the same
        ids, see :mod:`cryosiam_dask.instances.chunked`).
    report : InstanceReport

    Notes
    -----
    The windows and large components are segmented when this function is called (their keys persisted on the
    cluster when a ``distributed`` client is active); `labels` is a lazy lookup of those keys.
    """
    fg, dist = da.asarray(foreground), da.asarray(distance)
    if fg.ndim != 3 or fg.shape != dist.shape:
        raise ParameterError(
            "foreground", f"{fg.shape} and distance {dist.shape} must be 3-d arrays of one shape"
        )
    result = segment_chunked(
        fg.chunks, params, MemoryKeyStore(fg, dist.rechunk(fg.chunks)), limit_bytes=limit_bytes
    )
    return result.labels, result.report
