"""Hypothesis strategies and map builders for property tests: chunked results against whole-volume ones.

Needs ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage as ndi
from hypothesis import strategies as st

__all__ = ["assert_same_partition", "ball_chains", "ball_maps", "balls", "chunkings", "rods", "shape_maps"]


def balls(shape: tuple[int, int, int], *, radius: tuple[float, float] = (1.5, 3.5), max_size: int = 6) -> Any:
    """Lists of balls ``(z, y, x, radius)`` with centres inside `shape` (a hypothesis strategy)."""
    z, y, x = (float(n - 1) for n in shape)
    ball = st.tuples(st.floats(0, z), st.floats(0, y), st.floats(0, x), st.floats(*radius))
    return st.lists(ball, max_size=max_size)


def rods(shape: tuple[int, int, int], *, radius: tuple[float, float] = (1.5, 3.0), max_size: int = 2) -> Any:
    """Lists of rods ``(z0, y0, x0, z1, y1, x1, radius)``: segments with end points inside `shape`, as long
    as the volume (a hypothesis strategy)."""
    z, y, x = (float(n - 1) for n in shape)
    point = (st.floats(0, z), st.floats(0, y), st.floats(0, x))
    rod = st.tuples(*point, *point, st.floats(*radius))
    return st.lists(rod, max_size=max_size)


def ball_chains(
    shape: tuple[int, int, int],
    *,
    n_balls: tuple[int, int] = (6, 14),
    radius: tuple[float, float] = (2.0, 3.5),
    max_chains: int = 2,
) -> Any:
    """Lists of balls ``(z, y, x, radius)`` forming chains of touching balls (a hypothesis strategy).

    Each chain starts anywhere in `shape` and each next centre lies 0.6-1.3 radii from the previous one in a
    random direction (clipped to the volume), so a chain is one connected foreground and one support
    component, usually longer than a halo: crowded particles, filaments, blobs of touching particles.
    """
    z, y, x = (float(n - 1) for n in shape)
    start = st.tuples(st.floats(0, z), st.floats(0, y), st.floats(0, x))
    step = st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1), st.floats(0.6, 1.3))
    steps = st.lists(step, min_size=n_balls[0] - 1, max_size=n_balls[1] - 1)
    chain = st.tuples(start, st.floats(*radius), steps)

    def build(chains: list[Any]) -> list[tuple[float, float, float, float]]:
        out = []
        for origin, r, steps in chains:
            c = np.asarray(origin, float)
            out.append((*c, r))
            for dz, dy, dx, length in steps:
                d = np.asarray([dz, dy, dx])
                d = d / n if (n := float(np.linalg.norm(d))) > 1e-6 else np.asarray([0.0, 0.0, 1.0])
                c = np.clip(c + d * length * r, 0, [z, y, x])
                out.append((*c, r))
        return out

    return st.lists(chain, min_size=1, max_size=max_chains).map(build)


def chunkings(low: int = 6, high: int = 12) -> Any:
    """(z, y, x) chunk shapes with every edge in [low, high] (a hypothesis strategy)."""
    return st.tuples(st.integers(low, high), st.integers(low, high), st.integers(low, high))


def shape_maps(signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps like the network's training targets from a signed distance (positive inside the objects).

    Parameters
    ----------
    signed : (Z, Y, X) ndarray of float

    Returns
    -------
    foreground : (Z, Y, X) ndarray of float32
        ``signed > 0``, blurred (sigma 1).
    distance : (Z, Y, X) ndarray of float32
        `signed` clipped to [-5, 5].
    """
    dist = np.clip(signed, -5, 5).astype(np.float32)
    return ndi.gaussian_filter((dist > 0).astype(np.float32), 1.0), dist


def ball_maps(
    shape: tuple[int, int, int], spheres: list[tuple[float, ...]], rods: list[tuple[float, ...]] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Maps like the network's training targets, from balls (centre z, y, x, radius) and rods (segment end
    points z0, y0, x0, z1, y1, x1 and radius).

    Returns
    -------
    foreground : (Z, Y, X) ndarray of float32
        The union of the balls, blurred (sigma 1).
    distance : (Z, Y, X) ndarray of float32
        Signed distance to the nearest ball surface (max over balls), clipped to [-5, 5].
    """
    grid = np.indices(shape, dtype=np.float64)
    dist = np.full(shape, -5.0)
    for *centre, r in spheres:
        d = r - np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        dist = np.maximum(dist, d)
    for *ends, r in rods:
        p, q = np.asarray(ends[:3], float), np.asarray(ends[3:], float)
        v = q - p
        rel = grid - p[:, None, None, None]
        t = np.clip(np.tensordot(v, rel, axes=1) / max(float(v @ v), 1e-12), 0, 1)
        d = r - np.sqrt(((rel - v[:, None, None, None] * t) ** 2).sum(axis=0))
        dist = np.maximum(dist, d)
    return shape_maps(dist)


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """Assert that two label volumes are one partition: a one-to-one map of ids, background to background."""
    assert a.shape == b.shape
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1], "a label of the first maps to several of the second"
    assert np.unique(pairs[1]).size == pairs.shape[1], "a label of the second maps to several of the first"
    assert not ((pairs[0] == 0) ^ (pairs[1] == 0)).any(), "background differs"
