"""Viewer and downstream formats: instance labels as MRC (IMOD, Amira, ChimeraX), centroids as STAR (RELION).

Both are written atomically (:func:`cryosiam_dask.outputs.atomic.atomic_output`); the MRC chunk by chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from cryosiam_dask.errors import NotSupportedError, OutputError
from cryosiam_dask.outputs.atomic import _check_volume, _in_flight, _iter_blocks, atomic_output

__all__ = ["write_mrc_labels", "write_star"]


# ------------------------------------------------------------------------------------------------- MRC
def write_mrc_labels(
    path: str | os.PathLike[str],
    labels: da.Array,
    *,
    voxel_size: float | tuple[float, float, float],
    max_label: int | None = None,
    origin: tuple[float, float, float] | None = None,
) -> Path:
    """Write ``<stem>_instances.mrc`` (for Amira, IMOD, ChimeraX), chunk by chunk through a memory map.

    MRC has no 32-bit integer mode: ids up to 65535 are stored as mode 6 (uint16), larger ones as mode 2
    (float32), exact up to 2**24 = 16777216. More ids than that cannot be stored exactly: use the HDF5 or
    OME-Zarr output.

    Parameters
    ----------
    path : str or PathLike
        Output file.
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background.
    voxel_size : float or (3,) tuple of float
        Voxel size in Å, one value or (z, y, x), as in the tomogram's header.
    max_label : int, optional
        Largest id (e.g. from :func:`region_table`); computed from `labels` when not given.
    origin : (z, y, x) floats in Å, optional
        The tomogram's header origin, written to the header so that viewers overlay the labels on it.

    Returns
    -------
    Path
        The written file.
    """
    import mrcfile

    path = Path(path)
    labels = _check_volume(labels, "labels")
    if max_label is None:
        max_label = int(labels.max().compute()) if labels.size else 0
    if max_label >= 2**24:
        raise NotSupportedError(f"{path}: {max_label} instance ids do not fit an MRC file exactly "
                                "(float32 holds ids up to 16777216); use the .h5 or .ome.zarr output")
    mode = 6 if max_label < 2**16 else 2  # uint16, else float32
    vz, vy, vx = (voxel_size,) * 3 if np.isscalar(voxel_size) else tuple(voxel_size)
    lo, hi, total, squares = np.inf, -np.inf, 0.0, 0.0
    with atomic_output(path) as tmp:
        mrcfile.new_mmap(str(tmp), shape=labels.shape, mrc_mode=mode, overwrite=True).close()
        mrc, step = None, _in_flight()
        try:
            for i, (slices, (block,)) in enumerate(_iter_blocks([labels]), start=1):
                if block.size and int(block.max()) > max_label:
                    raise OutputError(f"{path}: label id {int(block.max())} exceeds max_label {max_label}")
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
                total += float(block.sum(dtype=np.float64))
                squares += sum(float(np.square(plane, dtype=np.float64).sum()) for plane in block)
                if mrc is None:
                    mrc = mrcfile.mmap(str(tmp), mode="r+")
                mrc.data[slices] = block  # cast to uint16/float32 on assignment
                if i % step == 0:  # unmap now and then, so written pages do not pile up in RSS
                    mrc.close()
                    mrc = None
        finally:
            if mrc is not None:
                mrc.close()
        with mrcfile.mmap(str(tmp), mode="r+") as mrc:
            mrc.voxel_size = (vx, vy, vz)
            if origin is not None:
                mrc.header.origin = (float(origin[2]), float(origin[1]), float(origin[0]))
            n = max(labels.size, 1)
            mean = total / n
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = np.sqrt(max(squares / n - mean * mean, 0.0))
    return path


# ------------------------------------------------------------------------------------------------ STAR
def write_star(
    path: str | os.PathLike[str],
    table: dict[str, np.ndarray],
    *,
    voxel_size: float | None = None,
    tomogram_name: str | None = None,
) -> Path:
    """Write instance centroids as a STAR file for RELION / Warp (block ``data_particles``).

    Columns: ``rlnCoordinateX/Y/Z`` (voxels, 0-based; x = centroid-2, y = centroid-1, z = centroid-0),
    ``rlnMicrographName`` (if `tomogram_name` is given), ``rlnImagePixelSize`` (Å, if `voxel_size` is given),
    ``cryosiamInstanceId`` (label id) and ``cryosiamVolumeVoxels`` (voxel count).

    Parameters
    ----------
    path : str or PathLike
        Output file.
    table : dict of str to (N,) ndarray
        From :func:`region_table`.
    voxel_size : float, optional
        Voxel size in Å.
    tomogram_name : str, optional
        Tomogram name, e.g. ``TS_01.mrc``.

    Returns
    -------
    Path
        The written file.
    """
    import pandas as pd
    import starfile

    path = Path(path)
    cols: dict[str, Any] = {}
    for axis, name in ((2, "X"), (1, "Y"), (0, "Z")):
        cols[f"rlnCoordinate{name}"] = np.asarray(table[f"centroid-{axis}"], float)
    n = len(cols["rlnCoordinateX"])
    if tomogram_name is not None:
        if any(c.isspace() for c in tomogram_name) or not tomogram_name:
            raise ValueError(f"tomogram name {tomogram_name!r} for {path} must be non-empty without spaces")
        cols["rlnMicrographName"] = [tomogram_name] * n
    if voxel_size is not None:
        cols["rlnImagePixelSize"] = np.full(n, float(voxel_size))
    cols["cryosiamInstanceId"] = np.asarray(table["label"], np.int64)
    cols["cryosiamVolumeVoxels"] = np.asarray(table["area"], np.int64)
    with atomic_output(path) as tmp:
        starfile.write({"particles": pd.DataFrame(cols)}, tmp, float_format="%.6f")
    return path
