"""The windows of a chunked volume (each chunk plus a halo, clipped to the volume), and one window segmented.

Why a window is exact. CryoSiam's post-processing is component-local: nothing crosses the boundary of a
26-connected component of ``support = (fg >= T) | (distance >= min_center_distance)`` (every marker lies in
the support, and the watershed floods only fg >= T). Inside a window everything is exact except near a face
that is not a volume face: the Gaussians (radius 2) and the clipped EDT (5) reach at most ``margin`` = 9
voxels (3 for distance_type 0, :func:`~cryosiam_dask.instances.params.margin_for`). A support component that
touches the chunk and stays out of that band is a whole-volume component, so its markers, keys and watershed
equal the whole-volume ones (relative raster order, and with it skimage's first-in-first-out tie order, is
unchanged by translation). The keys of the other components are flagged
(:data:`~cryosiam_dask.instances.keys.FLAG`) and their parts recorded, so they can be segmented whole
(:mod:`cryosiam_dask.instances.components`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.backend import get_xp, to_numpy
from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.components import Parts, core_parts
from cryosiam_dask.instances.keys import FLAG, marker_keys
from cryosiam_dask.instances.params import PostParams, margin_for

__all__ = ["Window", "WindowResult", "as_halo3", "plan_windows", "segment_window"]


def as_halo3(halo: int | tuple[int, int, int]) -> ShapeZYX:
    """The halo as (z, y, x) ints; ParameterError for anything else."""
    values = (halo,) * 3 if isinstance(halo, (int, np.integer)) else tuple(halo)
    if len(values) != 3 or not all(isinstance(h, (int, np.integer)) and h >= 0 for h in values):
        raise ParameterError("halo", f"must be an int >= 0 or three of them (z, y, x), got {halo!r}")
    return tuple(int(h) for h in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Window:
    """One chunk's window: the chunk plus the halo, clipped to the volume (all coordinates in voxels).

    Attributes
    ----------
    index : (i, j, k)
        The chunk's block index.
    region : three slices
        The chunk in the volume.
    window : three slices
        The window in the volume.
    core : three slices
        The chunk inside the window.
    cut : three (low, high) pairs
        Whether each window face lies inside the volume.
    """

    index: tuple[int, int, int]
    region: tuple[slice, slice, slice]
    window: tuple[slice, slice, slice]
    core: tuple[slice, slice, slice]
    cut: tuple[tuple[bool, bool], ...]

    @property
    def start(self) -> ShapeZYX:
        """The window's origin in the volume."""
        return tuple(s.start for s in self.window)  # type: ignore[return-value]


def plan_windows(
    chunks: tuple[tuple[int, ...], ...], halo: int | tuple[int, int, int], distance_type: int
) -> list[Window]:
    """The windows of every chunk, in block order; checks that the halo exceeds the post-processing's reach.

    Parameters
    ----------
    chunks : dask chunks of a (Z, Y, X) array
    halo : int or (z, y, x) ints
    distance_type : int

    Raises
    ------
    ParameterError
        `halo` is not >= 0, or not above :func:`margin_for` along an axis that has several chunks.
    """
    halo3, margin = as_halo3(halo), margin_for(distance_type)
    for axis, (h, c) in enumerate(zip(halo3, chunks, strict=True)):
        if len(c) > 1 and h <= margin:
            raise ParameterError(
                "halo",
                f"is {h} along axis {'zyx'[axis]} but must exceed {margin} (the reach of the "
                "smoothing and EDT) when that axis has several chunks",
            )
    shape = tuple(int(sum(c)) for c in chunks)
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in chunks]
    out = []
    for index in product(*(range(len(c)) for c in chunks)):
        lo = [int(bounds[a][i]) for a, i in enumerate(index)]
        hi = [int(bounds[a][i + 1]) for a, i in enumerate(index)]
        w0 = [max(0, lo[a] - halo3[a]) for a in range(3)]
        w1 = [min(shape[a], hi[a] + halo3[a]) for a in range(3)]
        out.append(
            Window(
                index=index,  # type: ignore[arg-type]
                region=tuple(slice(lo[a], hi[a]) for a in range(3)),  # type: ignore[arg-type]
                window=tuple(slice(w0[a], w1[a]) for a in range(3)),  # type: ignore[arg-type]
                core=tuple(slice(lo[a] - w0[a], hi[a] - w0[a]) for a in range(3)),  # type: ignore[arg-type]
                cut=tuple((w0[a] > 0, w1[a] < shape[a]) for a in range(3)),
            )
        )
    return out


@dataclass
class WindowResult:
    """One window segmented: the keys of its chunk and what the client needs of it (all small but `keys`).

    Attributes
    ----------
    keys : (cz, cy, cx) ndarray of uint64
        The chunk's keys, 0 = background; flagged (bit 63) on components reaching the window's cut band.
    unique : (k,) numpy.ndarray of uint64
        Its distinct non-zero keys.
    skipped : bool
        The window had no fg >= T: nothing was segmented.
    parts : Parts
        The chunk's support parts (:func:`~cryosiam_dask.instances.components.core_parts`).
    """

    keys: Any
    unique: np.ndarray
    skipped: bool
    parts: Parts


def _cut_band(shape: tuple[int, ...], cut: tuple[tuple[bool, bool], ...], margin: int, xp: Any) -> Any:
    """True on the `margin` voxels inside each cut face of a window of `shape`."""
    band = xp.zeros(shape, dtype=bool)
    for axis, (lo, hi) in enumerate(cut):
        index = [slice(None)] * 3
        if lo:
            index[axis] = slice(0, margin)
            band[tuple(index)] = True
        if hi:
            index[axis] = slice(shape[axis] - margin, None)
            band[tuple(index)] = True
    return band


def _empty(core_shape: tuple[int, ...], origin: ShapeZYX, params: PostParams, xp: Any) -> WindowResult:
    parts = Parts.empty(core_shape)
    if params.min_center_distance <= 0:  # the final distance (0 here) is in the support everywhere
        support = np.ones(core_shape, bool)
        parts = core_parts(support, ~support, np.zeros(core_shape, np.uint64), origin)
    return WindowResult(xp.zeros(core_shape, dtype=xp.uint64), np.zeros(0, np.uint64), True, parts)


def segment_window(
    foreground: Any,
    distance: Any,
    *,
    start: ShapeZYX,
    core: tuple[slice, slice, slice],
    cut: tuple[tuple[bool, bool], ...],
    shape: ShapeZYX,
    params: PostParams,
) -> WindowResult:
    """Segment one window (CryoSiam's in-memory post-processing) and key the voxels of its chunk.

    Parameters
    ----------
    foreground, distance : (z, y, x) numpy.ndarray or cupy.ndarray of float32
        The window's maps (chunk + halo, clipped to the volume).
    start : (z, y, x)
        The window's origin in the volume.
    core : three slices
        The chunk inside the window.
    cut : three (low, high) pairs
        Whether each window face lies inside the volume.
    shape : (z, y, x)
        The volume's shape.
    params : PostParams
    """
    from cryosiam_dask.instances.block import label_block, segment_block

    xp = get_xp(foreground)
    core_shape = tuple(s.stop - s.start for s in core)
    origin = tuple(o + s.start for o, s in zip(start, core, strict=True))
    if not bool((foreground >= params.threshold_foreground).any()):  # smoothing never raises the max
        return _empty(core_shape, origin, params, xp)  # type: ignore[arg-type]
    labels, markers, level_of, mask, dist = segment_block(foreground, distance, **params.watershed_kwargs())
    if not bool(mask.any()):
        return _empty(core_shape, origin, params, xp)  # type: ignore[arg-type]
    support = mask | (dist >= params.min_center_distance)
    comp, n_comp = label_block(support)
    flagged = xp.zeros(n_comp + 1, dtype=bool)
    flagged[comp[_cut_band(comp.shape, cut, params.margin, xp)]] = True
    flagged[0] = False
    key_of = marker_keys(markers, level_of, start, shape)
    lab = labels[core]
    flagged_core = flagged[comp[core]]
    keys = key_of[lab]
    keys = xp.where(flagged_core & (lab > 0), keys | xp.uint64(FLAG), keys)
    unique = to_numpy(xp.unique(keys))
    parts = core_parts(support[core], flagged_core, keys, origin)  # type: ignore[arg-type]
    return WindowResult(keys, unique[unique > 0], False, parts)
