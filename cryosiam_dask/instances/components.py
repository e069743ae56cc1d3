"""Support components larger than the halo: global labels from per-chunk parts, each one segmented whole.

The chunked watershed is exact for every 26-connected component of the support (see
:mod:`cryosiam_dask.instances.chunked`) that stays `margin` voxels away from the cut faces of each window it
touches. The other ("large") components are found and segmented here, in three steps like dask-image's
``label``:

1. Per chunk (:func:`core_parts`, run inside each window task): the 26-connected components of the support
   restricted to the chunk (its "parts", exact there since the halo exceeds the margin), with each part's
   bounding box, one seed voxel, whether it is flagged (its window component reaches the cut band: its keys
   carry :data:`~cryosiam_dask.instances.keys.FLAG`), its flagged keys, and the six face planes of the part
   labels.
2. On the client (:func:`link_parts`): parts on the two sides of every chunk face that are 26-neighbours are
   joined (each voxel against the 3 x 3 voxels facing it, on whole-volume planes, so edges and corners are
   covered); the connected components of that graph are the support's global components. A component with a
   flagged part is large; its box is the union of its parts' boxes.
3. One task per large component (:func:`component_keys`) segments its box grown by ``margin + 1`` (clipped to
   the volume). Keys are translation-invariant and local to a support component, and the component stays out
   of that crop's cut band, so they equal the whole-volume keys. The crop's keys are kept on the component's
   voxels only (its other voxels carry `MEMBER`), and :func:`~cryosiam_dask.instances.keys.combine_keys` lays
   them over the windows' keys chunk by chunk.

Memory: one large task holds about `BYTES_PER_VOXEL` bytes per voxel of its crop (tracemalloc peak of
:func:`component_keys` on a 48 x 64 x 64 crop of 60 balls: 151 for distance_type 0, 60 for types 1 and 2; plus
the float32 input maps). Components whose crop exceeds the limit (`DEFAULT_LIMIT_BYTES`, 4 GiB: 26.8 million
voxels, a 299^3 box) are *oversized*: they keep the windows' labels and are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.backend import get_xp, to_numpy
from cryosiam_dask.instances.keys import FLAG, MEMBER, marker_keys
from cryosiam_dask.instances.params import PostParams

__all__ = [
    "BYTES_PER_VOXEL",
    "DEFAULT_LIMIT_BYTES",
    "LargeComponent",
    "Parts",
    "component_keys",
    "core_parts",
    "limit_voxels",
    "link_parts",
    "plan_large",
]

BYTES_PER_VOXEL = 160
"""Peak bytes per crop voxel of one large-component task (segment_block + keys, float32 input maps)."""
DEFAULT_LIMIT_BYTES = 4 << 30
"""Default memory limit of one large-component task: 4 GiB."""

_FACES = ("z0", "z1", "y0", "y1", "x0", "x1")


def limit_voxels(limit_bytes: int) -> int:
    """The largest crop (voxels) a large-component task may segment within `limit_bytes`."""
    return int(limit_bytes) // BYTES_PER_VOXEL


@dataclass
class Parts:
    """The support components of one chunk ("parts"), numbered 1..n in raster order (all numpy).

    Attributes
    ----------
    n : int
        Number of parts.
    boxes : (n, 6) ndarray of int64
        Bounding box of each part in the volume: z0, z1, y0, y1, x0, x1 (stop exclusive).
    seeds : (n, 3) ndarray of int64
        The (z, y, x) volume coordinates of each part's first voxel (raster order).
    flagged : (n,) ndarray of bool
        The part lies in a window component that reaches the window's cut band (its keys are flagged).
    flagged_keys : (m, 2) ndarray of uint64
        Distinct (part, flagged key) pairs of the chunk.
    faces : dict of str to 2-d ndarray of int32
        The part labels on the chunk's first and last plane along each axis ("z0", "z1", "y0", ...).
    """

    n: int
    boxes: np.ndarray
    seeds: np.ndarray
    flagged: np.ndarray
    flagged_keys: np.ndarray
    faces: dict[str, np.ndarray]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for a done record (``np.savez``)."""
        out = {"parts_n": np.asarray(self.n), "parts_boxes": self.boxes, "parts_seeds": self.seeds}
        out |= {"parts_flagged": self.flagged, "parts_flagged_keys": self.flagged_keys}
        return out | {f"parts_face_{k}": v for k, v in self.faces.items()}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Parts:
        """The parts of a done record (:meth:`to_arrays`)."""
        faces = {k: np.asarray(a[f"parts_face_{k}"]) for k in _FACES}
        return cls(
            int(a["parts_n"]),
            a["parts_boxes"],
            a["parts_seeds"],
            a["parts_flagged"],
            a["parts_flagged_keys"],
            faces,
        )

    @classmethod
    def empty(cls, core_shape: tuple[int, ...]) -> Parts:
        """No parts, for a chunk of `core_shape` without support."""
        z, y, x = core_shape
        planes = {"z": (y, x), "y": (z, x), "x": (z, y)}
        faces = {k: np.zeros(planes[k[0]], np.int32) for k in _FACES}
        e = np.zeros
        return cls(0, e((0, 6), np.int64), e((0, 3), np.int64), e(0, bool), e((0, 2), np.uint64), faces)


def core_parts(support: Any, flagged_voxels: Any, keys: Any, origin: ShapeZYX) -> Parts:
    """The parts of one chunk (step 1), labelled on the host (scipy; a cupy support is copied over).

    Parameters
    ----------
    support : (cz, cy, cx) numpy.ndarray or cupy.ndarray of bool
        The support on the chunk (exact there).
    flagged_voxels : (cz, cy, cx) ndarray of bool
        Voxels of window components that reach the cut band.
    keys : (cz, cy, cx) ndarray of uint64
        The chunk's keys (bit 63 = flagged).
    origin : (z, y, x)
        The chunk's origin in the volume.
    """
    from scipy import ndimage as ndi

    lab, n = ndi.label(to_numpy(support), structure=np.ones((3, 3, 3), bool))
    lab = lab.astype(np.int32, copy=False)
    parts = Parts.empty(lab.shape)
    if n == 0:
        return parts
    o = np.asarray(origin, np.int64)
    boxes = np.array(
        [[b for s in sl for b in (s.start, s.stop)] for sl in ndi.find_objects(lab)], dtype=np.int64
    ) + np.repeat(o, 2)
    values, first = np.unique(lab.ravel(), return_index=True)
    seeds = np.stack(np.unravel_index(first[values > 0], lab.shape), axis=1).astype(np.int64) + o
    flagged = np.zeros(n + 1, bool)
    flagged[lab[to_numpy(flagged_voxels)]] = True
    k = to_numpy(keys)
    f = k >= FLAG
    pairs = np.unique(np.stack([lab[f].astype(np.uint64), k[f]], axis=1), axis=0).reshape(-1, 2)
    faces = {
        "z0": lab[0],
        "z1": lab[-1],
        "y0": lab[:, 0],
        "y1": lab[:, -1],
        "x0": lab[:, :, 0],
        "x1": lab[:, :, -1],
    }
    faces = {key: np.ascontiguousarray(v) for key, v in faces.items()}
    return Parts(int(n), boxes, seeds, flagged[1:], pairs.astype(np.uint64), faces)


def _face_pairs(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(p, 2) pairs of non-zero labels of two facing planes that are 26-neighbours (3 x 3 per voxel)."""
    out = []
    a, b = lo.shape
    for d0 in (-1, 0, 1):
        for d1 in (-1, 0, 1):
            s = lo[max(0, -d0) : a - max(0, d0), max(0, -d1) : b - max(0, d1)]
            t = hi[max(0, d0) : a - max(0, -d0), max(0, d1) : b - max(0, -d1)]
            m = (s > 0) & (t > 0)
            out.append(np.stack([s[m], t[m]], axis=1))
    return np.unique(np.concatenate(out), axis=0) if out else np.zeros((0, 2), np.int64)


def link_parts(
    parts: list[Parts], windows: list[Any], shape: ShapeZYX, chunks: tuple[tuple[int, ...], ...]
) -> tuple[list[np.ndarray], int]:
    """The global component of every part (step 2).

    Parameters
    ----------
    parts : one Parts per window, in the order of `windows`
    windows : the :class:`~cryosiam_dask.instances.windows.Window` list (block order)
    shape : (Z, Y, X) volume shape
    chunks : dask chunks of the volume

    Returns
    -------
    component_of : list of (n_k + 1,) ndarrays of int64
        Per window, the global component (1..n_components) of each part (entry 0 = background).
    n_components : int
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets = np.concatenate([[0], np.cumsum([p.n for p in parts])]).astype(np.int64)
    total = int(offsets[-1])
    edges = [np.zeros((0, 2), np.int64)]
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for i in range(len(chunks[axis]) - 1):
            planes = [np.zeros((shape[others[0]], shape[others[1]]), np.int64) for _ in range(2)]
            for k, w in enumerate(windows):
                side = w.index[axis] - i
                if side not in (0, 1):
                    continue
                face = parts[k].faces["zyx"[axis] + ("1" if side == 0 else "0")].astype(np.int64)
                face = np.where(face > 0, face + offsets[k], 0)
                planes[side][w.region[others[0]], w.region[others[1]]] = face
            edges.append(_face_pairs(planes[0], planes[1]))
    e = np.concatenate(edges)
    graph = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(total + 1, total + 1))
    _, comp = connected_components(graph, directed=False)
    # renumber 1..n in order of first part, 0 for the background node
    _, renum = np.unique(comp[1:], return_inverse=True)
    out = [
        np.concatenate([[0], renum[offsets[k] : offsets[k + 1]] + 1]).astype(np.int64)
        for k in range(len(parts))
    ]
    return out, int(renum.max() + 1) if total else 0


@dataclass(frozen=True)
class LargeComponent:
    """A support component with a flagged part: segmented whole by one task, unless it is oversized.

    Attributes
    ----------
    seed : (z, y, x)
        A voxel of the component (volume coordinates).
    crop : three slices
        Its bounding box grown by ``margin + 1``, clipped to the volume: what its task segments.
    oversized : bool
        The crop exceeds the memory limit of one task: the windows' (flagged) keys are kept.
    flagged_keys : (m,) ndarray of uint64
        The flagged keys its parts carry in the windows (in the id table only when it is oversized).
    """

    seed: tuple[int, int, int]
    crop: tuple[slice, slice, slice]
    oversized: bool
    flagged_keys: np.ndarray


def plan_large(
    parts: list[Parts],
    component_of: list[np.ndarray],
    n_components: int,
    shape: ShapeZYX,
    margin: int,
    limit_bytes: int,
) -> tuple[list[LargeComponent], list[int]]:
    """The large components (step 2), ordered by their first part (deterministic), and their global ids."""
    large = np.zeros(n_components + 1, bool)
    for p, c in zip(parts, component_of, strict=True):
        large[c[1:][p.flagged]] = True
    if not large.any():
        return [], []
    lo = np.full((n_components + 1, 3), np.iinfo(np.int64).max)
    hi = np.full((n_components + 1, 3), -1)
    seed = np.full((n_components + 1, 3), -1)
    flagged: list[list[np.ndarray]] = [[] for _ in range(n_components + 1)]
    for p, c in zip(parts, component_of, strict=True):
        g = c[1:]
        if p.n == 0:
            continue
        np.minimum.at(lo, g, p.boxes[:, 0::2])
        np.maximum.at(hi, g, p.boxes[:, 1::2])
        unseen = seed[g, 0] < 0
        seed[g[unseen]] = p.seeds[unseen]
        if len(p.flagged_keys):
            fg = g[p.flagged_keys[:, 0].astype(np.int64) - 1]
            for gid in np.unique(fg[large[fg]]):
                flagged[gid].append(p.flagged_keys[fg == gid, 1])
    out, limit = [], limit_voxels(limit_bytes)
    for gid in np.flatnonzero(large):
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo[gid], hi[gid], strict=True))
        crop = tuple(
            slice(max(0, s.start - margin - 1), min(n, s.stop + margin + 1))
            for s, n in zip(box, shape, strict=True)
        )
        voxels = int(np.prod([s.stop - s.start for s in crop]))
        keys = np.unique(np.concatenate(flagged[gid] + [np.zeros(0, np.uint64)]))
        out.append(LargeComponent(tuple(int(v) for v in seed[gid]), crop, voxels > limit, keys))  # type: ignore[arg-type]
    return out, [int(g) for g in np.flatnonzero(large)]


def component_keys(
    foreground: Any,
    distance: Any,
    *,
    crop: tuple[slice, slice, slice],
    seed: tuple[int, int, int],
    shape: ShapeZYX,
    params: PostParams,
) -> tuple[Any, np.ndarray]:
    """Segment one large component whole (step 3).

    Parameters
    ----------
    foreground, distance : (cz, cy, cx) numpy.ndarray or cupy.ndarray of float32
        The maps on `crop`.
    crop : three slices
        The crop in the volume (the component's box grown by margin + 1, clipped to the volume).
    seed : (z, y, x)
        A voxel of the component (volume coordinates).
    shape : (Z, Y, X)
        The volume's shape.
    params : PostParams

    Returns
    -------
    keys : (cz, cy, cx) ndarray of uint64
        The whole-volume keys on the component's voxels in fg >= T, `MEMBER` on its other voxels, 0 elsewhere.
    unique : (k,) numpy.ndarray of uint64
        The distinct keys.
    """
    from cryosiam_dask.instances.block import label_block, segment_block

    xp = get_xp(foreground)
    start = tuple(s.start for s in crop)
    labels, markers, level_of, mask, dist = segment_block(foreground, distance, **params.watershed_kwargs())
    comp, _ = label_block(mask | (dist >= params.min_center_distance))
    member = comp == comp[tuple(int(v) - s for v, s in zip(seed, start, strict=True))]
    key_of = marker_keys(markers, level_of, start, shape)  # type: ignore[arg-type]
    keys = key_of[labels]
    keys = xp.where(member, xp.where(keys > 0, keys, xp.uint64(MEMBER)), xp.uint64(0))
    unique = to_numpy(xp.unique(keys))
    return keys, unique[(unique > 0) & (unique != MEMBER)]
