"""Synthetic tomograms with ground truth, for tests, benchmarks and the demo.

The volumes imitate CryoSiam's instance input (the denoised, inverted, [0, 1]-scaled tomogram): bright
particles with smooth profiles on a dark background plus smooth noise. Everything is (z, y, x) and
deterministic by seed. This module does not import torch (checkpoints are written by
:mod:`cryosiam_dask.testing.checkpoints`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryosiam_dask._types import ShapeZYX

__all__ = [
    "SyntheticTomogram",
    "make_large_mrc",
    "make_tomogram",
    "write_mask_h5",
    "write_mrc",
]

logger = logging.getLogger(__name__)

_BACKGROUND = 0.15
_CONTRAST = 0.7
_MAX_TRIES = 2000


@dataclass
class SyntheticTomogram:
    """A synthetic tomogram and its ground truth.

    Attributes
    ----------
    tomogram : (Z, Y, X) ndarray of float32
        Values in [0, 1]; particles bright (up to about 0.85) on a dark background (about 0.15), plus noise.
    labels : (Z, Y, X) ndarray of uint32
        Ground-truth instances 1..N (particle ``i`` has id ``i + 1``), 0 = background. Where two
        particles of a touching pair overlap, the voxel goes to the particle with the higher profile value.
    mask : (Z, Y, X) ndarray of uint8 or None
        Lamella slab: 1 for z in [lo, hi), else 0; None when no lamella was asked for.
    centers : (N, 3) ndarray of float64
        Particle centres (z, y, x) in voxels.
    radii : (N,) ndarray of float64
        Particle radii in voxels.
    touching : list of (int, int)
        Label ids of the touching pairs.
    """

    tomogram: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None
    centers: np.ndarray
    radii: np.ndarray
    touching: list[tuple[int, int]]


def _fits(center: np.ndarray, radius: float, centers: list, radii: list, gap: float) -> bool:
    if not centers:
        return True
    d = np.linalg.norm(np.asarray(centers) - center, axis=1)
    return bool(np.all(d >= np.asarray(radii) + radius + gap))


def _random_center(rng: np.random.Generator, shape: ShapeZYX, radius: float) -> np.ndarray:
    margin = np.minimum(radius / 2, np.asarray(shape) / 2 - 0.5)
    return rng.uniform(margin, np.asarray(shape) - 1 - margin)


def _place_particles(
    rng: np.random.Generator,
    shape: ShapeZYX,
    n_particles: int,
    radii_range: tuple[float, float],
    touching_pairs: int,
    planes: Iterable[tuple[int, float] | Mapping[int, float]] | None,
    gap: float,
) -> tuple[list[np.ndarray], list[float], list[tuple[int, int]]]:
    """Centres and radii: particles on ``planes``, then touching pairs, then the rest (rejection)."""
    centers: list[np.ndarray] = []
    radii: list[float] = []
    touching: list[tuple[int, int]] = []
    for plane in planes or ():
        fixed = dict(plane) if isinstance(plane, Mapping) else {int(plane[0]): float(plane[1])}
        for _ in range(_MAX_TRIES):
            r = float(rng.uniform(*radii_range))
            c = _random_center(rng, shape, r)
            for axis, pos in fixed.items():
                c[axis] = pos
            if _fits(c, r, centers, radii, gap):
                centers.append(c)
                radii.append(r)
                break
        else:
            logger.warning("no room for a particle centred on %s", fixed)
    for _ in range(touching_pairs):
        for _ in range(_MAX_TRIES):
            r1, r2 = (float(v) for v in rng.uniform(*radii_range, size=2))
            c1 = _random_center(rng, shape, r1)
            u = rng.normal(size=3)
            c2 = c1 + rng.uniform(0.6, 0.85) * (r1 + r2) * u / np.linalg.norm(u)
            inside = np.all(c2 >= r2 / 2) and np.all(c2 <= np.asarray(shape) - 1 - r2 / 2)
            if inside and _fits(c1, r1, centers, radii, gap) and _fits(c2, r2, centers, radii, gap):
                centers += [c1, c2]
                radii += [r1, r2]
                touching.append((len(centers) - 1, len(centers)))
                break
        else:
            logger.warning("no room for a touching pair")
    while len(centers) < n_particles:
        for _ in range(_MAX_TRIES):
            r = float(rng.uniform(*radii_range))
            c = _random_center(rng, shape, r)
            if _fits(c, r, centers, radii, gap):
                centers.append(c)
                radii.append(r)
                break
        else:
            logger.warning("placed %d of %d particles: no room left", len(centers), n_particles)
            break
    return centers, radii, touching


def make_tomogram(
    shape: ShapeZYX = (64, 96, 96),
    *,
    n_particles: int = 20,
    radii: tuple[float, float] = (3, 7),
    seed: int = 0,
    touching_pairs: int = 2,
    planes: Sequence[tuple[int, float] | Mapping[int, float]] | None = None,
    noise: float = 0.05,
    lamella: tuple[int, int] | None = None,
    gap: float = 2.0,
) -> SyntheticTomogram:
    """Make a synthetic tomogram of bright round particles with ground-truth instance labels.

    Parameters
    ----------
    shape : (3,) tuple of int, default (64, 96, 96)
        (Z, Y, X).
    n_particles : int, default 20
        Total number of particles (those on ``planes`` and in touching pairs included). Fewer are
        placed, with a warning logged, when the volume is too crowded.
    radii : (2,) tuple of float, default (3, 7)
        Radii are drawn uniformly from this range (voxels).
    seed : int, default 0
        Seed: the same arguments give the same volume.
    touching_pairs : int, default 2
        Pairs whose centres are 0.6-0.85 of the sum of their radii apart, so that they overlap.
    planes : sequence, optional
        Where the caller wants particles centred, e.g. on chunk faces: ``(axis, position)`` pins one
        coordinate (a face); a mapping ``{axis: position, ...}`` pins two or three (an edge or a corner).
    noise : float, default 0.05
        Standard deviation of the added smooth (Gaussian-filtered, sigma 1) noise.
    lamella : (2,) tuple of int, optional
        ``(lo, hi)``: also return a lamella mask, 1 for z in [lo, hi). Default None: no mask.
    gap : float, default 2.0
        Minimum surface distance (voxels) between particles that are not a touching pair.

    Returns
    -------
    SyntheticTomogram
        ``tomogram`` float32 in [0, 1], ``labels`` uint32, ``mask`` uint8 or None, all (Z, Y, X).

    Examples
    --------
    >>> syn = make_tomogram((32, 48, 48), n_particles=5, seed=1)
    >>> syn.tomogram.dtype, int(syn.labels.max())
    (dtype('float32'), 5)
    """
    from scipy import ndimage as ndi

    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    centers, rads, touching = _place_particles(
        rng, shape, n_particles, (float(radii[0]), float(radii[1])), touching_pairs, planes, gap
    )
    profile = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint32)
    for i, (c, r) in enumerate(zip(centers, rads, strict=True)):
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        grid = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d2 = sum((g - cc) ** 2 for g, cc in zip(grid, c, strict=True))
        p = np.clip(1.0 - d2 / (r * r), 0.0, None).astype(np.float32)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        win = p > profile[box]
        profile[box][win] = p[win]
        labels[box][win & (p > 0)] = i + 1
    tomogram = _BACKGROUND + _CONTRAST * profile
    if noise > 0:
        smooth = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
        smooth *= noise / max(float(smooth.std()), 1e-12)
        tomogram += smooth
    tomogram = np.clip(tomogram, 0.0, 1.0).astype(np.float32)
    mask = None
    if lamella is not None:
        mask = np.zeros(shape, dtype=np.uint8)
        mask[int(lamella[0]) : int(lamella[1])] = 1
    return SyntheticTomogram(
        tomogram=tomogram,
        labels=labels,
        mask=mask,
        centers=np.asarray(centers, dtype=np.float64).reshape(-1, 3),
        radii=np.asarray(rads, dtype=np.float64),
        touching=touching,
    )


def write_mrc(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    voxel_size: float | tuple[float, float, float] = 10.0,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write a (Z, Y, X) array as an MRC file (dtype kept: float32, float16, int8, int16 or uint16).

    Parameters
    ----------
    path : str or PathLike
        Output file; overwritten if present. ``.gz`` / ``.bz2`` suffixes write a compressed file.
    array : (Z, Y, X) ndarray
    voxel_size : float or (3,) tuple of float, default 10.0
        Å; a tuple is (z, y, x).
    origin : (3,) tuple of float, default (0, 0, 0)
        Header origin (z, y, x) in Å.
    """
    import mrcfile

    path = Path(path)
    name = path.name.lower()
    compression = "gzip" if name.endswith(".gz") else "bzip2" if name.endswith(".bz2") else None
    with mrcfile.new(path, overwrite=True, compression=compression) as mrc:
        mrc.set_data(np.ascontiguousarray(array))
        vs = (voxel_size,) * 3 if np.isscalar(voxel_size) else tuple(voxel_size)
        mrc.voxel_size = (vs[2], vs[1], vs[0])
        mrc.header.origin = (origin[2], origin[1], origin[0])
    return path


def write_mask_h5(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a lamella mask like CryoSiam's lamella step: dataset ``labels``, uint8, gzip-compressed."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.asarray(mask).astype(np.uint8), compression="gzip")
    return path


def make_large_mrc(
    path: str | os.PathLike,
    shape: ShapeZYX,
    *,
    seed: int = 0,
    slab: int = 32,
    voxel_size: float = 10.0,
) -> Path:
    """Write a big float32 MRC slab by slab through ``mrcfile.new_mmap``, never holding the volume in memory.

    Values are uniform in [0, 1), drawn slab after slab from ``numpy.random.default_rng(seed)``.

    Parameters
    ----------
    path : str or PathLike
        Output file (overwritten).
    shape : (3,) tuple of int
        (Z, Y, X).
    seed : int, default 0
    slab : int, default 32
        z-planes generated at a time.
    voxel_size : float, default 10.0
        Å.
    """
    import mrcfile

    path = Path(path)
    rng = np.random.default_rng(seed)
    with mrcfile.new_mmap(path, shape=tuple(int(s) for s in shape), mrc_mode=2, overwrite=True) as mrc:
        for z0 in range(0, shape[0], slab):
            z1 = min(z0 + slab, shape[0])
            mrc.data[z0:z1] = rng.random((z1 - z0, shape[1], shape[2]), dtype=np.float32)
            mrc.flush()
        mrc.voxel_size = voxel_size
    return path
