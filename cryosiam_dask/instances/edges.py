"""The region adjacency graph of a label block with the summed values over its touching voxel pairs.

For the multicut: every pair of face-neighbour voxels with different labels (background 0 is an ordinary
node) adds both voxels' values to the edge's sum and 2 to its count; ``sums / counts`` is nifty's and
bioimage-cpp's mean edge-map feature. Per chunk, a 1-voxel low halo makes each cross-face pair counted
once, by the higher chunk; :func:`merge_edge_stats` reduces the chunks' results. All arrays are (z, y, x).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["EdgeStats", "edge_stats", "merge_edge_stats"]

EdgeStats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(u, v, sums, counts): edges u < v (uint64), float64 sums, int64 counts."""


def _reduce_edges(u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> EdgeStats:
    """Group rows by (u, v), summing ``sums`` and ``counts``; result sorted lexicographically by (u, v)."""
    u = np.asarray(u, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    if u.size == 0:
        return (
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint64),
            np.zeros(0, np.float64),
            np.zeros(0, np.int64),
        )
    vmax = int(v.max())
    if vmax < 2**32 - 1:
        key = u * np.uint64(vmax + 1) + v
        uniq, inverse = np.unique(key, return_inverse=True)
        uu, vv = np.divmod(uniq, np.uint64(vmax + 1))
    else:  # ids too large for a packed key
        order = np.lexsort((v, u))
        us, vs = u[order], v[order]
        start = np.ones(us.size, dtype=bool)
        start[1:] = (us[1:] != us[:-1]) | (vs[1:] != vs[:-1])
        inverse = np.empty(u.size, dtype=np.int64)
        inverse[order] = np.cumsum(start) - 1
        uu, vv = us[start], vs[start]
    n = uu.size
    s = np.bincount(inverse, weights=sums, minlength=n).astype(np.float64)
    c = np.bincount(inverse, weights=counts, minlength=n).astype(np.int64)
    return uu.astype(np.uint64), vv.astype(np.uint64), s, c


def edge_stats(labels: np.ndarray, values: np.ndarray, *, low_halo: Sequence[int] = (0, 0, 0)) -> EdgeStats:
    """Edges between touching labels of a block and the sum of ``values`` over their voxel pairs.

    Every pair of face-neighbour voxels (6-connectivity in 3D) with different labels contributes to the
    edge ``(min label, max label)``: both voxels' values are added to ``sums`` and 2 to ``counts``. Label 0
    (background) is an ordinary node. ``sums / counts`` is nifty's / bioimage-cpp's mean edge-map feature.

    Chunked use: a pair is counted by the block that owns its higher voxel. A block with a lower neighbour
    along an axis gets ``low_halo = 1`` there (one plane copied from that neighbour); pairs lying entirely in
    the halo planes are skipped, pairs from a halo voxel to a core voxel are counted. No high halo is needed
    or allowed: the block's last plane pairs with the next block's halo there. Merging the results of all
    blocks with :func:`merge_edge_stats` then equals the whole-volume result.

    Parameters
    ----------
    labels : ndarray, shape (Z, Y, X), uint32 or uint64 (any integer dtype)
        Watershed fragment ids in (z, y, x) order; 0 = background (node 0).
    values : ndarray, shape (Z, Y, X), float
        Edge map (the bilateral-filtered boundary probabilities), same shape as ``labels``.
    low_halo : sequence of int (0 or 1), length ``labels.ndim``
        Number of leading halo planes per axis.

    Returns
    -------
    u, v : ndarray, shape (E,), uint64
        Unique edges with ``u < v``, sorted lexicographically.
    sums : ndarray, shape (E,), float64
        Sum of ``values`` over both voxels of every counted pair.
    counts : ndarray, shape (E,), int64
        Number of voxels summed (2 per pair).
    """
    labels = np.asarray(labels)
    values = np.asarray(values)
    if labels.shape != values.shape:
        raise ValueError(f"labels {labels.shape} and values {values.shape} differ in shape")
    halo = tuple(int(h) for h in low_halo)
    if len(halo) != labels.ndim or any(h not in (0, 1) for h in halo):
        raise ValueError(f"low_halo must be {labels.ndim} values in (0, 1), got {low_halo}")
    us, vs, ss = [], [], []
    for ax in range(labels.ndim):
        n = labels.shape[ax]
        first_hi = max(halo[ax], 1)  # the higher voxel of a pair must be in the core (index >= halo)
        if n <= first_hi:
            continue
        lo_idx, hi_idx = [], []
        for b in range(labels.ndim):
            if b == ax:
                lo_idx.append(slice(first_hi - 1, n - 1))
                hi_idx.append(slice(first_hi, n))
            else:
                lo_idx.append(slice(halo[b], None))
                hi_idx.append(slice(halo[b], None))
        la, lb = labels[tuple(lo_idx)], labels[tuple(hi_idx)]
        diff = la != lb
        if not diff.any():
            continue
        a, b_ = la[diff].astype(np.uint64), lb[diff].astype(np.uint64)
        us.append(np.minimum(a, b_))
        vs.append(np.maximum(a, b_))
        ss.append(
            values[tuple(lo_idx)][diff].astype(np.float64) + values[tuple(hi_idx)][diff].astype(np.float64)
        )
    if not us:
        return _reduce_edges(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    s = np.concatenate(ss)
    return _reduce_edges(np.concatenate(us), np.concatenate(vs), s, np.full(s.size, 2, dtype=np.int64))


def merge_edge_stats(stats: Sequence[EdgeStats]) -> EdgeStats:
    """Reduce several blocks' :func:`edge_stats` results by summing per edge.

    Parameters
    ----------
    stats : sequence of (u, v, sums, counts)
        Per-block results (u, v uint64; sums float64; counts int64; each shape (E_i,)).

    Returns
    -------
    u, v, sums, counts : ndarray, shape (E,)
        Unique edges (uint64, u < v, sorted lexicographically), summed sums (float64) and counts (int64).
    """
    stats = list(stats)
    if not stats:
        return _reduce_edges(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    return _reduce_edges(
        np.concatenate([np.asarray(s[0], dtype=np.uint64) for s in stats]),
        np.concatenate([np.asarray(s[1], dtype=np.uint64) for s in stats]),
        np.concatenate([np.asarray(s[2], dtype=np.float64) for s in stats]),
        np.concatenate([np.asarray(s[3], dtype=np.int64) for s in stats]),
    )


# --------------------------------------------------------------------------------------------------------
# Multicut
# --------------------------------------------------------------------------------------------------------
