"""CryoSiam's region table (label, area, bbox, centroid) of a chunked label volume, and its CSV file.

Per-chunk partial statistics are merged by a tree reduction, so the table is exact
(``skimage.measure.regionprops_table``'s values) without loading the volume whole.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.backend import to_numpy
from cryosiam_dask.outputs.atomic import _check_volume, atomic_output

__all__ = ["REGION_COLUMNS", "region_table", "write_regions_csv"]

REGION_COLUMNS = (
    "label", "area", "bbox-0", "bbox-1", "bbox-2", "bbox-3", "bbox-4", "bbox-5",
    "centroid-0", "centroid-1", "centroid-2",
)
"""CryoSiam's region-table columns, in order (``regionprops_table`` names, z, y, x voxel order)."""


# ---------------------------------------------------------------------------------------- region table
def _block_stats(block: Any, offset: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per-label partial statistics of one chunk: ids, voxel counts, bbox min/max (inclusive), coord sums.

    Memory: the chunk, its dense local ids (int32) and per-plane temporaries, i.e. about 2-3 chunk sizes.
    """
    from scipy import ndimage

    block = to_numpy(block)
    ids = np.unique(block)
    shift = 0 if ids.size and ids[0] == 0 else 1  # local id 0 = background, 1..n = ids
    ids = ids[1 - shift :]
    n = ids.size
    out = {
        "label": ids.astype(np.int64),
        "count": np.zeros(n, np.int64),
        "min": np.zeros((n, 3), np.int64),
        "max": np.zeros((n, 3), np.int64),
        "sum": np.zeros((n, 3), np.int64),
    }
    if n == 0:
        return out
    search = ids if shift else np.r_[np.zeros(1, ids.dtype), ids]
    local = np.empty(block.shape, np.int32)
    yy, xx = (c.astype(np.float64) for c in np.indices(block.shape[1:]))
    sums = np.zeros((n + 1, 3), np.float64)
    for z in range(block.shape[0]):  # one plane at a time: counts and y/x sums, z sums from the counts
        plane = np.searchsorted(search, block[z]).astype(np.int32) + shift
        local[z] = plane
        counts = np.bincount(plane.ravel(), minlength=n + 1)
        out["count"] += counts[1:]
        sums[:, 0] += z * counts
        sums[:, 1] += np.bincount(plane.ravel(), weights=yy.ravel(), minlength=n + 1)
        sums[:, 2] += np.bincount(plane.ravel(), weights=xx.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(local, max_label=n)
    out["min"] = np.array([[s.start for s in box] for box in boxes], np.int64) + offset
    out["max"] = np.array([[s.stop - 1 for s in box] for box in boxes], np.int64) + offset
    out["sum"] = np.rint(sums[1:]).astype(np.int64) + out["count"][:, None] * np.asarray(offset, np.int64)
    return out


def _merge_stats(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Combine partial statistics of several chunks into one row per label id (sorted)."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cat["label"], kind="stable")
    cat = {k: v[order] for k, v in cat.items()}
    if cat["label"].size == 0:
        return cat
    starts = np.flatnonzero(np.r_[True, np.diff(cat["label"]) != 0])
    return {
        "label": cat["label"][starts],
        "count": np.add.reduceat(cat["count"], starts),
        "min": np.minimum.reduceat(cat["min"], starts, axis=0),
        "max": np.maximum.reduceat(cat["max"], starts, axis=0),
        "sum": np.add.reduceat(cat["sum"], starts, axis=0),
    }


def region_table(labels: da.Array, *, fan_in: int = 8) -> dict[str, np.ndarray]:
    """CryoSiam's region table of a chunked label volume, without loading it whole.

    Each chunk gives per-label partial statistics (voxel count, bounding-box min/max, coordinate sums),
    which a tree reduction of `fan_in` parts per step combines, so labels spanning chunks are counted once.

    Parameters
    ----------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background, unique across the whole volume (not per chunk). numpy or cupy chunks.
    fan_in : int, default 8
        Partial tables merged per reduction step.

    Returns
    -------
    dict of str to (N,) ndarray
        Exactly ``regionprops_table(labels, properties=['label', 'area', 'bbox', 'centroid'])``
        (skimage.measure) of the whole volume: keys :data:`REGION_COLUMNS`; ``label`` and ``bbox-*``
        int64, ``area`` and ``centroid-*`` float64; bbox and centroids in voxels, (z, y, x), bbox ends
        exclusive; one row per id, sorted.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> lab = da.from_array(np.array([[[0, 1, 1, 2]]], np.uint32), chunks=(1, 1, 2))
    >>> region_table(lab)["area"]
    array([2., 1.])
    """
    labels = _check_volume(labels, "labels")
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in labels.chunks]
    blocks = labels.to_delayed()
    parts = [
        dask.delayed(_block_stats)(blocks[b], tuple(int(s[j]) for s, j in zip(starts, b, strict=True)))
        for b in np.ndindex(*labels.numblocks)
    ]
    while len(parts) > 1:
        parts = [dask.delayed(_merge_stats)(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    (stats,) = dask.compute(parts[0])
    stats = _merge_stats(stats)  # also covers a single chunk
    count = stats["count"]
    table = {"label": stats["label"], "area": count.astype(np.float64)}
    for axis in range(3):
        table[f"bbox-{axis}"] = stats["min"][:, axis]
    for axis in range(3):
        table[f"bbox-{axis + 3}"] = stats["max"][:, axis] + 1
    for axis in range(3):
        table[f"centroid-{axis}"] = stats["sum"][:, axis].astype(np.float64) / count
    return table


def write_regions_csv(path: str | os.PathLike[str], table: dict[str, np.ndarray]) -> Path:
    """Write ``<stem>_instance_regions.csv`` exactly as CryoSiam does (``csv.writer``, CRLF, header first).

    Parameters
    ----------
    path : str or PathLike
        Output file.
    table : dict of str to (N,) ndarray
        From :func:`region_table` (or ``regionprops_table``); the columns :data:`REGION_COLUMNS` are
        written in that order. Values are written as Python prints them (``38.0`` for a float area,
        the shortest repr for centroids).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    missing = [c for c in REGION_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"region table for {path} lacks columns {missing}")
    columns = [np.asarray(table[c]).tolist() for c in REGION_COLUMNS]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(REGION_COLUMNS)
        writer.writerows(zip(*columns, strict=True))
    return path

