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
    Each chunk is split into cores of at most ``window - 2·margin`` voxels per axis; each core is evaluated
    once with ``margin`` voxels of context on each side, its window start rounded down to a multiple of 8
    (the network's stride) and its length up to a multiple of 8. As in the original, there is no context
    beyond the near faces and the far faces wrap around. Agreement with ``exact`` and speed: see
    :func:`fast_defaults`.
"""

from __future__ import annotations

import itertools

import numpy as np

from cryosiam_dask._types import ShapeZYX

__all__ = ["BLOCK_RANGES", "STRIDE", "Plan", "exact_patch_evaluations", "fast_defaults", "inference_edges",
           "kept_ranges", "owned_edges"]

STRIDE = 8
"""Total down-sampling of the network (res5 is at 1/8): fast windows start and end on multiples of it."""
BLOCK_RANGES = 2
"""Default most patches per axis in one ``exact`` inference block (a task of at most 8 patches)."""


def fast_defaults(patch: int) -> tuple[int, int]:
    """Default ``(margin, window)`` of the ``fast`` tiling for a patch edge `patch`.

    margin = p/4 rounded up to a multiple of 8 (the original's smallest context); window = 2p, at least 128
    and at most 192 (a 192³ window of the real architecture holds about 1.8 GB per 64-channel float32 tensor).
    Window 128 instead of 64 (p = 32, tiny network, 64×128×128 chunk, warm worker) cut the maps stage from
    3.3 s to 1.7 s at the same margin: fewer, larger windows recompute less of their margins.

    Measured on 2 shared CPU cores (sync scheduler, torch 2 threads), golden checkpoint (p = 32), against
    ``exact``: max/mean abs difference of foreground, distance, boundary; wall time, whole-volume original in
    brackets. Timings on this shared machine vary up to 4x from run to run; the differences are exact.

    - golden 40×61×44, one chunk, margin 8, window 64: 0.163/0.0076, 1.07/0.069, 0.17/0.0057; 2.2 s (7.3 s)
    - golden, one chunk, 16, 96: 0.151/0.0078, 0.98/0.071, 0.17/0.0059; 1.4 s
    - golden, one chunk, 32, 128: 0.150/0.0078, 0.98/0.070, 0.17/0.0059; 1.5 s
    - golden, chunks 24×32×32, 8, 64: 0.149/0.0075, 1.05/0.072, 0.21/0.0052; 8.6 s
    - golden, chunks 24×32×32, 16, 64: 0.155/0.0075, 0.98/0.068, 0.15/0.0055; 8.1 s
    - synthetic 48×80×80, one chunk, 8, 64: 0.166/0.0033, 0.81/0.061, 0.25/0.0052; 0.7 s (1.7 s)
    - synthetic, one chunk, 16, 96: 0.162/0.0038, 0.79/0.068, 0.28/0.0062; 1.5 s
    - synthetic, chunks 24×32×32, 8, 64: 0.212/0.0038, 0.85/0.068, 0.24/0.0049; 3.9 s

    The difference hardly depends on the margin: it is the original's own context limit (a patch keeps
    only voxels 8 to 24 voxels from its border), not fast's; a larger margin does not bring fast closer to
    ``exact``, so the default keeps p/4. Chunk size matters more for speed than the margin: with the tiny
    network, chunks under 2p cost more in per-task overhead and small windows than they save (real
    architecture, 64³, p = 64, chunks 64×64×32, 2 workers: fast 20 s vs whole 61 s, exact 90 s).
    """
    margin = -(-patch // 4 // STRIDE) * STRIDE
    return margin, max(min(max(2 * patch, 128), 192), 2 * margin + STRIDE)


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


def _window_slices(job, w0) -> tuple[slice, ...]:
    return tuple(slice(p[0] - o, p[0] - o + p[1]) for p, o in zip(job, w0, strict=True))
