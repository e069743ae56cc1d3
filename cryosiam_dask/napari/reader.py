"""napari reader of our outputs: lazy (dask) layers, the voxel size as scale and the origin as translation.

========================== ===========================================================================
file                        layers
========================== ===========================================================================
``<stem>.ome.zarr``         tomogram (image, multiscale), ``labels/instances`` (labels, multiscale), the
                            raw maps under ``maps/`` (images, hidden)
``<stem>_instance_preds.h5`` ``instances`` (labels)
``<stem>_instances.mrc``    labels
``<stem>_preds.h5``         ``foreground``, ``distances``, ``boundaries`` (images), or CryoSiam's lamella /
                            semantic ``labels`` (labels)
========================== ===========================================================================

Scale and translation are in ångström, (z, y, x), so every layer overlays the tomogram. The OME-Zarr and
MRC files carry them; our h5 files carry ``voxel_size``/``origin`` attributes, and for an h5 file without
them (written by CryoSiam or an older version) they are taken from the sibling ``<stem>.ome.zarr`` or
``<stem>_instances.mrc``, else 1 Å and 0 with a warning. This module imports no napari or Qt: it returns
napari's ``(data, kwargs, layer_type)`` tuples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["geometry_of", "napari_get_reader", "output_kind", "read_output"]

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
Geometry = tuple[tuple[float, float, float], tuple[float, float, float]]

SUFFIXES = {
    ".ome.zarr": "ome-zarr",
    "_instance_preds.h5": "instances-h5",
    "_instances.mrc": "instances-mrc",
    "_preds.h5": "preds-h5",
}
"""Name endings of our outputs and their kinds (``_instance_preds.h5`` is tested before ``_preds.h5``)."""

MAP_COLORMAPS = {"foreground": "magma", "distances": "viridis", "boundaries": "gray"}


def output_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind of output `path` names (a key of :data:`SUFFIXES`' values), or None."""
    name = Path(path).name
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    return None


def _stem(path: Path) -> str:
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _three(values: Any) -> tuple[float, float, float]:
    v = np.asarray(values, np.float64).ravel()
    if v.size == 1:
        v = np.repeat(v, 3)
    return tuple(float(x) for x in v[-3:])  # type: ignore[return-value]


def _mrc_geometry(path: Path) -> Geometry:
    import mrcfile

    with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
        vs, o = mrc.voxel_size, mrc.header.origin
        voxel = (float(vs.z), float(vs.y), float(vs.x))
        origin = (float(o.z), float(o.y), float(o.x))
    return tuple(v if v > 0 else 1.0 for v in voxel), origin  # type: ignore[return-value]


def _ome_geometry(path: Path) -> Geometry | None:
    import zarr

    from cryosiam_dask.io.ome import read_scale_translation

    found = read_scale_translation(dict(zarr.open_group(str(path), mode="r").attrs))
    return None if found is None else (_three(found[0]), _three(found[1]))


def geometry_of(path: str | os.PathLike[str]) -> tuple[Geometry, str]:
    """Voxel size and origin (z, y, x, Å) of an output, and where they came from.

    Returns
    -------
    ((voxel_size, origin), source)
        `source` is ``"file"``, the sibling file's name, or ``"default"`` (1 Å, origin 0).
    """
    path = Path(path)
    kind = output_kind(path)
    if kind == "ome-zarr":
        found = _ome_geometry(path)
        return (found, "file") if found else (((1.0,) * 3, (0.0,) * 3), "default")
    if kind == "instances-mrc":
        return _mrc_geometry(path), "file"
    import h5py

    with h5py.File(path, "r") as f:
        if "voxel_size" in f.attrs:
            origin = _three(f.attrs["origin"]) if "origin" in f.attrs else (0.0, 0.0, 0.0)
            return (_three(f.attrs["voxel_size"]), origin), "file"
    stem = _stem(path)
    for sibling in (path.with_name(f"{stem}.ome.zarr"), path.with_name(f"{stem}_instances.mrc")):
        try:
            found = _ome_geometry(sibling) if sibling.suffix == ".zarr" else _mrc_geometry(sibling)
        except Exception:  # absent or unreadable sibling: try the next one
            continue
        if found is not None:
            return found, sibling.name
    logger.warning("%s has no voxel size and no sibling .ome.zarr or _instances.mrc: scale 1, origin 0", path)
    return ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "default"


def _kwargs(name: str, geometry: Geometry, source: str, path: Path, **extra: Any) -> dict[str, Any]:
    voxel, origin = geometry
    meta = {"path": str(path), "voxel_size": voxel, "origin": origin, "geometry_from": source}
    return {"name": name, "scale": voxel, "translate": origin, "metadata": meta, **extra}


def _levels(group: Any) -> list[da.Array]:
    """The arrays of an NGFF multiscale group, finest first, as dask arrays read from zarr."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    paths = [d["path"] for d in ome["multiscales"][0]["datasets"]]
    return [da.from_zarr(group[p]) for p in paths]


def _read_ome_zarr(path: Path) -> list[LayerData]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    geometry, source = geometry_of(path)
    stem = _stem(path)
    image = _levels(root)
    layers: list[LayerData] = [(image if len(image) > 1 else image[0],
                                _kwargs(stem, geometry, source, path, multiscale=len(image) > 1), "image")]
    if "maps" in root:
        for name in sorted(root["maps"].group_keys()):
            data = _levels(root["maps"][name])[0]
            extra = {"visible": False, "colormap": MAP_COLORMAPS.get(name, "gray"), "blending": "additive"}
            layers.append((data, _kwargs(f"{stem} {name}", geometry, source, path, **extra), "image"))
    if "labels" in root and "instances" in root["labels"]:
        levels = _levels(root["labels"]["instances"])
        data = levels if len(levels) > 1 else levels[0]
        kw = _kwargs(f"{stem} instances", geometry, source, path, multiscale=len(levels) > 1)
        layers.append((data, kw, "labels"))
    return layers


def _h5_arrays(path: Path) -> dict[str, da.Array]:
    """Every 3-d dataset at the top of an h5 file as a dask array (the file stays open while in use)."""
    import h5py

    f = h5py.File(path, "r")
    out = {}
    for name, dset in f.items():
        if isinstance(dset, h5py.Dataset) and dset.ndim == 3:
            out[name] = da.from_array(dset, chunks=dset.chunks or "auto", name=f"{path}:{name}")
    return out


def _read_h5(path: Path, kind: str) -> list[LayerData]:
    geometry, source = geometry_of(path)
    stem, arrays = _stem(path), _h5_arrays(path)
    layers: list[LayerData] = []
    for name, data in arrays.items():
        label_like = name in ("instances", "labels") or np.issubdtype(data.dtype, np.integer)
        if label_like:
            layers.append((data, _kwargs(f"{stem} {name}", geometry, source, path), "labels"))
        else:
            extra: dict[str, Any] = {"colormap": MAP_COLORMAPS.get(name, "gray"), "blending": "additive",
                                     "visible": name == "foreground"}
            if name in ("foreground", "boundaries"):
                extra["contrast_limits"] = (0.0, 1.0)
            layers.append((data, _kwargs(f"{stem} {name}", geometry, source, path, **extra), "image"))
    if not layers:
        raise ValueError(f"{path}: no 3-d dataset to show (expected 'instances', maps or 'labels')")
    return layers


def _read_mrc(path: Path) -> list[LayerData]:
    import mrcfile

    geometry, source = geometry_of(path)
    mrc = mrcfile.mmap(path, mode="r", permissive=True)  # kept open: the array maps the file
    data = mrc.data
    if data.dtype.kind == "f":  # float32 ids above 65535 (see write_mrc_labels): exact integers
        data = da.from_array(data, chunks="auto").astype(np.uint32)
    else:
        data = da.from_array(data, chunks="auto")
    return [(data, _kwargs(f"{_stem(path)} instances", geometry, source, path), "labels")]


def read_output(path: str | os.PathLike[str] | list[str]) -> list[LayerData]:
    """The napari layers of one output file (see the module's table).

    Parameters
    ----------
    path : str, PathLike or a one-element list of them

    Returns
    -------
    list of (data, kwargs, layer_type)
        Data are dask arrays (lists of them for multiscale OME-Zarr); kwargs carry ``name``, ``scale``
        (voxel size, Å), ``translate`` (origin, Å) and ``metadata`` (path, where the geometry came from).
    """
    if isinstance(path, list):
        return [layer for p in path for layer in read_output(p)]
    path = Path(path)
    kind = output_kind(path)
    if kind == "ome-zarr":
        return _read_ome_zarr(path)
    if kind == "instances-mrc":
        return _read_mrc(path)
    if kind in ("instances-h5", "preds-h5"):
        return _read_h5(path, kind)
    raise ValueError(f"{path}: not a cryosiam_dask output ({', '.join(SUFFIXES)})")


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: :func:`read_output` when every path is one of our outputs, else None."""
    paths = path if isinstance(path, list) else [path]
    if not paths or any(output_kind(p) is None for p in paths):
        return None
    return read_output
