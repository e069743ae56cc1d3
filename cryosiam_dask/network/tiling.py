"""Tiling plans: which network windows write into which output chunk (pure index arithmetic, no arrays).

For every output chunk a small per-axis *plan* lists the network windows that write into it:
``(start, length, lo, hi)`` means "evaluate the window ``[start, start + length)`` of the (SpatialPadded,
far-end wrapped) volume and keep its output on ``[lo, hi)``". :mod:`cryosiam_dask.network.predict` runs
the plans.

``exact``
    The windows are the original's patches (spec §4): starts at multiples of p/2, each patch keeps its
    centre-crop range and, where ranges overlap at the far end, the patch with the largest start wins (the
    original's later-write-wins rule). The maps equal ``reference.predict_whole`` for any chunking. The
    network runs on inference blocks whose edges sit on the kept-range grid (:func:`inference_edges`, each
    storage chunk edge snapped to the nearest ``k·p/2 + p/4``), so every patch is evaluated exactly once
    whatever the storage chunking (:func:`exact_patch_evaluations`); the maps are rechunked to the storage
    chunks after.
``fast``
    Each axis of the volume is split evenly into cores of at most ``window - 2·margin`` voxels
    (:func:`fast_edges`), on a grid of the whole volume, so the maps do not depend on the storage chunking
    either; each core is evaluated once with ``margin`` voxels of context on each side, its window start
    rounded down to a multiple of 8 (the network's stride) and its length up to a multiple of 8. As in the
    original, there is no context beyond the near faces and the far faces wrap around. Agreement with
    ``exact`` and speed: see :func:`fast_defaults`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from cryosiam_dask._types import ShapeZYX

__all__ = ["BLOCK_RANGES", "STRIDE", "Plan", "exact_patch_evaluations", "fast_defaults", "fast_edges",
           "inference_edges", "kept_ranges", "owned_edges"]

STRIDE = 8
"""Total down-sampling of the network (res5 is at 1/8): fast windows start and end on multiples of it."""
BLOCK_RANGES = 2
"""Default most patches per axis in one ``exact`` inference block (a task of at most 8 patches)."""


def fast_defaults(patch: int) -> tuple[int, int]:
    """Default ``(margin, window)`` of the ``fast`` tiling for a patch edge `patch`.

    margin = p/4 rounded up to a multiple of 8 (the original's smallest context); window = 1.5p rounded up
    to a multiple of 8, at least 96 and at most 192, so a core is p voxels for p >= 64.

    Why not larger windows: the real architecture's encoder holds several 64-channel float32 tensors of the
    whole window, and larger windows are not faster per voxel on CPU. Real architecture, p = 64, margin 16,
    one window, kept range only, 1 thread, per output voxel and peak RSS: 96³ 31.7 µs and 1.8 GiB, 128³
    32.8 µs and 4.1 GiB, 112×160×160 29.9 µs and 5.6 GiB (and 1.7 s, 0.8 GiB per exact 64³ patch, whose
    32³ kept voxels cost 52 µs each). Measured before the 1×1×1 convolutions ran as a matrix product
    (:class:`~cryosiam_dask.network.folding.Pointwise`); after it, 96³ 20.4 µs and 1.69 GiB, 1.20 s per patch.

    Agreement with ``exact``, golden checkpoint (p = 32), one chunk, max/mean abs difference of foreground,
    distance, boundary: margin 8, window 64: 0.163/0.0076, 1.07/0.069, 0.17/0.0057; margin 16, window 96:
    0.151/0.0078, 0.98/0.071, 0.17/0.0059; margin 32, window 128: 0.150/0.0078, 0.98/0.070, 0.17/0.0059.
    The difference hardly depends on the margin: it is the original's own context limit (a patch keeps
    only voxels 8 to 24 voxels from its border), not fast's; a larger margin does not bring fast closer to
    ``exact``, so the default keeps p/4.
    """
    margin = -(-patch // 4 // STRIDE) * STRIDE
    window = -(-(3 * patch // 2) // STRIDE) * STRIDE
    return margin, max(min(max(window, 96), 192), 2 * margin + STRIDE)


def fast_edges(n: int, *, margin: int, window: int) -> list[int]:
    """Core edges of the ``fast`` tiling along an axis of `n` voxels: ``ceil(n / core)`` even cores.

    ``core = window - 2 * margin`` (at least :data:`STRIDE`). The grid is the volume's, not the chunks', so
    each voxel is computed by the same window whatever the storage chunking.
    """
    core = max(window - 2 * margin, STRIDE)
    return np.linspace(0, n, -(-n // core) + 1).round().astype(int).tolist()


Plan = tuple[tuple[int, int, list[tuple[int, int, int, int]]], ...]
"""Per axis: (window start, window end, [(start, length, lo, hi), ...]) in volume coordinates."""


# --------------------------------------------------------------------------- exact and fast plans
def kept_ranges(size: int, patch: int) -> list[tuple[int, int, int]]:
    """Patches of one axis that the original keeps, in its order: ``(start, lo, hi)``, output ``[lo, hi)``.

    ``size`` is the size after SpatialPad (``max(n, patch)``). The rules are §4's, first match wins: skip a
    patch starting at or after ``size - patch//4``; the first keeps ``[0, 3p/4)``; a patch reaching ``size``
    keeps ``[start + p/4, size)``; the others keep ``[start + p/4, start + 3p/4)``.
    """
    step, q = int(round(0.5 * patch)), patch // 4
    out = []
    for c0 in range(0, size, step):
        if c0 >= size - q:
            continue
        if c0 == 0:
            out.append((c0, 0, patch - q))
        elif c0 + patch >= size:
            out.append((c0, c0 + q, size))
        else:
            out.append((c0, c0 + q, c0 + patch - q))
    return out


def _owned_ranges(size: int, patch: int) -> list[tuple[int, int, int]]:
    """Kept ranges after the later-write-wins rule: ``(start, lo, hi)``, disjoint, covering ``[0, size)``."""
    kept = kept_ranges(size, patch)
    owner = np.full(size, -1)
    for i, (_, lo, hi) in enumerate(kept):
        owner[lo:hi] = i
    out = []
    for i, (c0, _, _) in enumerate(kept):
        where = np.flatnonzero(owner == i)
        if where.size:
            out.append((c0, int(where[0]), int(where[-1]) + 1))
    return out


def _exact_axis(a: int, b: int, size: int, patch: int) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    owned = _owned_ranges(size, patch)
    pieces = [(c0, patch, max(lo, a), min(hi, b)) for c0, lo, hi in owned if lo < b and hi > a]
    return pieces[0][0], pieces[-1][0] + patch, pieces


def _fast_axis(
    a: int, b: int, size: int, *, margin: int, window: int
) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    core = max(window - 2 * margin, STRIDE)
    n_cores = -(-(b - a) // core)
    bounds = np.linspace(a, b, n_cores + 1).round().astype(int)
    pieces = []
    for u, v in itertools.pairwise(bounds.tolist()):
        start = max(0, (u - margin) // STRIDE * STRIDE)
        length = -(-(v + margin - start) // STRIDE) * STRIDE
        pieces.append((start, length, u, v))
    return min(p[0] for p in pieces), max(p[0] + p[1] for p in pieces), pieces


def owned_edges(n: int, patch: int) -> list[int]:
    """Edges of the original's owned (kept) ranges along an axis of `n` voxels, clipped to ``[0, n]``."""
    edges = sorted({min(lo, n) for _, lo, _ in _owned_ranges(max(n, patch), patch)} | {n})
    return [e for e in edges if e <= n]


def inference_edges(
    n: int, chunk_edges: list[int], patch: int, max_ranges: int | None = BLOCK_RANGES
) -> list[int]:
    """Inference-block edges of the ``exact`` tiling along one axis: each chunk edge snapped to the nearest
    owned-range edge, so that every patch writes into exactly one block (and is evaluated once), and blocks
    of more than `max_ranges` owned ranges split evenly.

    Parameters
    ----------
    n : int
        Axis length.
    chunk_edges : list of int
        The storage chunks' edges, ``0 .. n``.
    patch : int
        Patch edge.
    max_ranges : int or None, default :data:`BLOCK_RANGES`
        Most owned ranges (patches) per block along the axis; None: blocks follow the chunks only.
        Splitting changes no value (each patch still runs once, on the same input) but gives the workers
        tasks of a few patches each, so a run of a few large chunks keeps every worker busy and balanced.
    """
    grid = np.asarray(owned_edges(n, patch))
    snapped = sorted({0, n} | {int(grid[np.argmin(np.abs(grid - e))]) for e in chunk_edges})
    if max_ranges is None:
        return snapped
    if max_ranges < 1:
        raise ValueError(f"max_ranges must be >= 1, got {max_ranges}")
    out = [0]
    for a, b in itertools.pairwise(snapped):
        inner = [int(g) for g in grid if a < g < b]  # owned-range edges inside the block
        k = len(inner) + 1
        pieces = -(-k // max_ranges)
        cuts = [inner[round(i * k / pieces) - 1] for i in range(1, pieces)]
        out += [*cuts, b]
    return out


def exact_patch_evaluations(
    shape: ShapeZYX, chunks: tuple[tuple[int, ...], ...], patch: ShapeZYX
) -> tuple[int, int]:
    """Patch evaluations of the ``exact`` tiling for storage `chunks`, and the number of distinct patches.

    The inference blocks sit on the owned-range grid (:func:`inference_edges`), so the two are equal for any
    chunking.
    """
    per_axis = []
    for n, c, p in zip(shape, chunks, patch, strict=True):
        edges = inference_edges(n, np.cumsum((0,) + tuple(c)).tolist(), p)
        size = max(n, p)
        per_axis.append([len(_exact_axis(int(a), int(b), size, p)[2]) for a, b in itertools.pairwise(edges)])
    total = sum(int(np.prod(k)) for k in itertools.product(*per_axis))
    distinct = int(np.prod([len(_owned_ranges(max(n, p), p)) for n, p in zip(shape, patch, strict=True)]))
    return total, distinct


# --------------------------------------------------------------- windows read modulo the padded size
def _segments(w0: int, w1: int, size: int, n: int) -> list[tuple[int, int, int]]:
    """Pieces ``(window_lo, window_hi, source_lo)`` of ``[w0, w1)`` read modulo `size`, without pad zeros."""
    out, w = [], w0
    while w < w1:
        src = w % size
        length = min(w1 - w, size - src)
        if src < n:
            out.append((w - w0, w - w0 + min(length, n - src), src))
        w += length
    return out


def _reads(lo: int, hi: int, w0: int, w1: int, size: int, n: int) -> bool:
    """Whether source range [lo, hi) holds data that the window [w0, w1) (read modulo size) uses."""
    return any(src < hi and src + (b - a) > lo for a, b, src in _segments(w0, w1, size, n))


def _window_slices(job: Sequence[Sequence[int]], w0: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(p[0] - o, p[0] - o + p[1]) for p, o in zip(job, w0, strict=True))
