"""``<stem>.ome.zarr``: the tomogram as a multiscale OME-Zarr image with the instances as its label image.

Axes are z, y, x in ångström; NGFF 0.4 (zarr v2) or 0.5 (zarr v3). Written chunk by chunk and atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np

from cryosiam_dask.io.ome import write_image_metadata, write_label_metadata
from cryosiam_dask.outputs.atomic import _check_volume, atomic_output

__all__ = ["write_ome_zarr"]

def _write_multiscale(
    group: Any, data: da.Array, *, voxel_size: tuple[float, float, float],
    origin: tuple[float, float, float] | None, levels: int, is_label: bool, version: str, name: str,
) -> None:
    """Write `data` and its 2x-downsampled levels into `group`, each level made from the stored one."""
    chunks = tuple(min(c, 128) for c in data.chunksize) if is_label else data.chunksize
    level = data
    written = 0
    for k in range(levels):
        if k > 0:
            prev = da.from_zarr(group[str(k - 1)])
            shape = tuple(s // 2 for s in prev.shape)
            if min(shape) == 0:
                break
            if is_label:
                level = prev[::2, ::2, ::2][: shape[0], : shape[1], : shape[2]]
            else:
                level = da.coarsen(np.mean, prev, {0: 2, 1: 2, 2: 2}, trim_excess=True).astype(data.dtype)
        level_chunks = tuple(min(c, s) for c, s in zip(chunks, level.shape, strict=True))
        level = level.rechunk(level_chunks)
        kwargs: dict[str, Any] = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        if version == "0.5":
            kwargs = {"dimension_names": ["z", "y", "x"]}
        arr = group.create_array(str(k), shape=level.shape, chunks=level_chunks, dtype=level.dtype,
                                 fill_value=0, **kwargs)
        # chunks equal the zarr chunks, so tasks never share a zarr chunk (da.to_zarr would rechunk to "auto")
        da.store(level, arr, lock=False)
        written += 1
    write_image_metadata(group, levels=written, voxel_size=voxel_size, origin=origin, name=name,
                         version=version)


def write_ome_zarr(
    path: str | os.PathLike[str],
    tomogram: da.Array,
    labels: da.Array,
    *,
    voxel_size: float | tuple[float, float, float],
    origin: tuple[float, float, float] | None = None,
    maps: dict[str, da.Array] | None = None,
    levels: int = 3,
    ngff_version: Literal["0.4", "0.5"] = "0.4",
) -> Path:
    """Write ``<stem>.ome.zarr``: the tomogram as a multiscale image, the instances as its label image.

    Layout: ``0, 1, ...`` tomogram levels (2x mean downsampling); ``labels/instances/0, 1, ...`` instance ids
    (2x stride subsampling, uint32) with ``image-label`` metadata; ``maps/<name>/0`` each raw map, a one-level
    multiscale image. Axes are z, y, x in ångström with ``scale`` = voxel size times 2**level.
    NGFF 0.4 (zarr v2, the default) opens in napari-ome-zarr, Fiji/MoBIE and neuroglancer; 0.5 (zarr v3) in
    napari-ome-zarr and recent ome-zarr-py. Arrays are written chunk by chunk (``da.store``); each coarser
    level is read back from the level written before, so `labels` is computed once.

    Parameters
    ----------
    path : str or PathLike
        Output directory; an existing one is replaced when the new one is complete.
    tomogram : (Z, Y, X) dask.array.Array
        The input tomogram (any dtype, usually float32).
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background.
    voxel_size : float or (3,) tuple of float
        Voxel size in Å, one value or (z, y, x).
    origin : (3,) tuple of float, optional
        The tomogram's header origin (z, y, x, Å), written as every level's ``translation``.
    maps : dict of str to (Z, Y, X) dask.array.Array of float32, optional
        Raw maps to add, e.g. ``{"foreground": fg, "distances": dist, "boundaries": bnd}``.
    levels : int, default 3
        Pyramid levels (fewer if the volume gets smaller than 1 voxel along an axis).
    ngff_version : {"0.4", "0.5"}, default "0.4"
        OME-Zarr version: 0.4 on zarr v2, 0.5 on zarr v3.

    Returns
    -------
    Path
        The written directory.
    """
    import zarr

    path = Path(path)
    tomogram, labels = _check_volume(tomogram, "tomogram"), _check_volume(labels, "labels")
    maps = {k: _check_volume(v, f"maps[{k!r}]") for k, v in (maps or {}).items()}
    for name, arr in [("labels", labels), *maps.items()]:
        if arr.shape != tomogram.shape:
            raise ValueError(f"{path}: {name} shape {arr.shape} differs from tomogram shape {tomogram.shape}")
    if ngff_version not in ("0.4", "0.5"):
        raise ValueError(f"ngff_version must be '0.4' or '0.5', got {ngff_version!r}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    vs = (float(voxel_size),) * 3 if np.isscalar(voxel_size) else tuple(float(v) for v in voxel_size)
    zarr_format = 2 if ngff_version == "0.4" else 3
    labels = labels.astype(np.uint32) if labels.dtype != np.uint32 else labels
    opts = {"voxel_size": vs, "origin": origin, "version": ngff_version}
    with atomic_output(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        _write_multiscale(root, tomogram, levels=levels, is_label=False, name=path.name.split(".")[0], **opts)
        label_root = root.create_group("labels")
        inst = label_root.create_group("instances")
        _write_multiscale(inst, labels, levels=levels, is_label=True, name="instances", **opts)
        write_label_metadata(label_root, "instances", version=ngff_version)
        if maps:
            map_root = root.create_group("maps")
            for name, arr in maps.items():
                group = map_root.create_group(name)
                _write_multiscale(group, arr, levels=1, is_label=False, name=name, **opts)
    return path
