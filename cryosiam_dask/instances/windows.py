"""The windows of a chunked volume: each chunk plus a halo, clipped to the volume, and the halo's rules."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import ParameterError

__all__ = ["Window", "as_halo3", "margin_for", "plan_windows"]


def margin_for(distance_type: int) -> int:
    """Width (voxels) of the band at a cut window face where the window's maps may differ from the volume's.

    2 for the Gaussians, + 5 for the clipped EDT + 2 for its blur (types 1 and 2), + 1 so that a trusted
    component's neighbours are exact too.
    """
    return 9 if distance_type in (1, 2) else 3


def as_halo3(halo: int | tuple[int, int, int]) -> ShapeZYX:
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


