"""OME-Zarr (NGFF) metadata of our images: written with ome-zarr-py, read back as voxel size and origin.

Axes are always z, y, x of type ``space`` in ``angstrom``; every dataset level has a ``scale`` (the voxel size
times 2**level) and, when the tomogram has a header origin, a ``translation`` (the origin, Å). NGFF 0.4 is the
zarr v2 layout (viewers' default today), 0.5 the zarr v3 one.
"""

from __future__ import annotations

from typing import Any

ZYX = ("z", "y", "x")


def _format(version: str) -> Any:
    from ome_zarr.format import FormatV04, FormatV05

    return {"0.4": FormatV04, "0.5": FormatV05}[version]()


def level_transforms(
    voxel_size: tuple[float, float, float], origin: tuple[float, float, float] | None, level: int
) -> list[dict[str, Any]]:
    """``coordinateTransformations`` of pyramid level `level` (scale x 2**level, then the origin)."""
    scale = [float(v if v > 0 else 1.0) * 2**level for v in voxel_size]
    out: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if origin is not None and any(float(o) != 0.0 for o in origin):
        out.append({"type": "translation", "translation": [float(o) for o in origin]})
    return out


def write_image_metadata(
    group: Any,
    *,
    levels: int,
    voxel_size: tuple[float, float, float],
    origin: tuple[float, float, float] | None,
    name: str,
    version: str,
) -> None:
    """Write the ``multiscales`` metadata of arrays ``"0" .. str(levels - 1)`` already in `group`.

    Parameters
    ----------
    group : zarr.Group
        v2 group for NGFF 0.4, v3 for 0.5.
    levels : int
        Number of pyramid levels present.
    voxel_size, origin : (z, y, x) floats, Å
        Level 0's voxel size and the header origin (None or zeros: no translation).
    name : str
        The image's name.
    version : {"0.4", "0.5"}
    """
    from ome_zarr.writer import write_multiscales_metadata

    datasets = [
        {"path": str(k), "coordinateTransformations": level_transforms(voxel_size, origin, k)}
        for k in range(levels)
    ]
    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in ZYX]
    write_multiscales_metadata(group, datasets, fmt=_format(version), axes=axes, name=name)


def write_label_metadata(group: Any, name: str, *, version: str) -> None:
    """Declare ``group/labels/<name>`` a label image of `group`'s image (``image-label`` and ``labels``)."""
    from ome_zarr.writer import write_label_metadata as write

    write(group, name, fmt=_format(version), source={"image": "../../"})


def read_scale_translation(attrs: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Level 0's (scale, translation) in (z, y, x) from NGFF 0.4 or 0.5 group attributes, or None."""
    ome = attrs.get("ome", attrs)
    try:
        transforms = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    except (KeyError, IndexError, TypeError):
        return None
    scale, translation = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    for t in transforms:
        if t.get("type") == "scale":
            scale = tuple(float(v) for v in t["scale"][-3:])
        elif t.get("type") == "translation":
            translation = tuple(float(v) for v in t["translation"][-3:])
    return scale, translation
