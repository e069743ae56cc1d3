"""Instance keys: the canonical id of a marker that every window computes alike, and their lookup to ids.

``key = level * n_voxels + global raster index of the marker's first voxel + 1``, where level is the index
of the distance level at which the marker vanished
(:func:`~cryosiam_dask.instances.block.find_markers_with_levels`).
Sorting the keys is CryoSiam's id order (by vanishing level, then raster order), so the position of a key in
the sorted table of all keys, plus one, is CryoSiam's instance id.

Bit 63 (:data:`FLAG`) marks the keys of a window whose support component reaches the window's cut band (not
exact there: such components are segmented whole, :mod:`cryosiam_dask.instances.components`). A large
component's crop carries :data:`MEMBER` (the flag alone, never a real key) on its voxels outside fg >= T.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.backend import get_xp

__all__ = ["FLAG", "MEMBER", "combine_keys", "id_table", "keys_to_ids", "marker_keys"]

FLAG = np.uint64(1 << 63)
"""Bit set on the keys a window could not make exact (they sort after every exact key)."""
MEMBER = FLAG
"""A large component's crop value on its voxels outside fg >= T (the flag with no key bits: never a key)."""


def marker_keys(markers: Any, level_of: Any, start: ShapeZYX, shape: ShapeZYX) -> Any:
    """The key of every marker id of a block at `start` in a volume of `shape`.

    Parameters
    ----------
    markers : (z, y, x) ndarray of int
        Marker ids of the block (0 = none).
    level_of : (n + 1,) ndarray of int
        The vanishing level of each marker id.
    start, shape : (z, y, x) ints
        The block's origin and the volume's shape.

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


def id_table(uniques: list[np.ndarray]) -> np.ndarray:
    """The sorted table of distinct keys (uint64): the position of a key + 1 is its instance id."""
    return np.unique(np.concatenate([np.asarray(u, np.uint64) for u in uniques] + [np.zeros(0, np.uint64)]))


def keys_to_ids(keys: Any, table: np.ndarray) -> Any:
    """Map keys (uint64, any shape) to ids 1..N (uint32) through the sorted `table`; 0 stays 0."""
    xp = get_xp(keys)
    table = xp.asarray(table)
    ids = xp.searchsorted(table, keys) + 1
    return xp.where(keys > 0, ids, 0).astype(xp.uint32)


def combine_keys(keys: Any, region: tuple[slice, ...], pieces: list[tuple[Any, tuple[slice, ...]]]) -> Any:
    """A chunk's keys with the large components' keys laid over them.

    Parameters
    ----------
    keys : (cz, cy, cx) ndarray of uint64
        The window keys of the chunk at `region` (volume coordinates).
    pieces : list of (crop keys, crop slices)
        Each large component's keys on its crop (ndarray or zarr array) and the crop.

    Returns
    -------
    (cz, cy, cx) ndarray of uint64
    """
    xp = get_xp(keys)
    out = xp.array(keys, copy=True)
    for arr, crop in pieces:
        inter = [slice(max(r.start, c.start), min(r.stop, c.stop)) for r, c in zip(region, crop, strict=True)]
        if any(s.start >= s.stop for s in inter):
            continue
        src = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(inter, crop, strict=True))
        dst = tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(inter, region, strict=True))
        piece = xp.asarray(arr[src])
        view = out[dst]
        view[...] = xp.where(piece == xp.uint64(MEMBER), xp.uint64(0), xp.where(piece > 0, piece, view))
    return out
