"""The instances written back into a copick project: an instance segmentation and picks of one pickable
object.

The segmentation (``is_instance=True``, named after the object) is an OME-Zarr 0.5 image written chunk by
chunk by the dask workers (128³ chunks, unsharded, so no two tasks share a stored object); its ``multiscales``
metadata is written last, so copick's readers (which open level 0 through it) never see a half-written
segmentation. The picks are the instance centroids in Å (voxel centroid × voxel size, x/y/z order) with
the instance ids. Only the segmentation and picks of our ``user_id`` and ``session_id``
are replaced on a rerun.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import dask.array as da
import numpy as np

from cryosiam_dask.io.ome import write_image_metadata
from cryosiam_dask.outputs.atomic import _check_volume

__all__ = ["write_copick"]

_CHUNK = 128  # copick's own chunk edge


def _picks_positions(table: dict[str, np.ndarray], voxel_size: float) -> np.ndarray:
    """(N, 3) x, y, z in Å of the region table's (z, y, x) voxel centroids."""
    if not len(table["label"]):
        return np.zeros((0, 3))
    zyx = np.stack([np.asarray(table[f"centroid-{k}"], dtype=np.float64) for k in range(3)], axis=1)
    return zyx[:, ::-1] * float(voxel_size)


def write_copick(
    ref: Any,
    labels: da.Array,
    table: dict[str, np.ndarray],
    *,
    object_name: str,
    user_id: str,
    session_id: str,
) -> dict[str, PurePosixPath]:
    """Write one run's instances into its copick project.

    Parameters
    ----------
    ref : cryosiam_dask.io.copick.CopickTomogram
        The run, voxel spacing and project the tomogram came from.
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids, 0 = background, same shape as the run's tomogram at ``ref.voxel_spacing``.
    table : dict of str to ndarray
        :func:`~cryosiam_dask.outputs.regions.region_table` of `labels` (``label``, ``centroid-0..2``).
    object_name, user_id, session_id : str
        The pickable object, and whose segmentation and picks these are.

    Returns
    -------
    dict
        ``copick_segmentation`` and ``copick_picks``: where copick stored them.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    labels = _check_volume(labels, "labels")
    run = ref.copick_run()
    vs = float(ref.voxel_spacing)
    seg = run.new_segmentation(
        vs, object_name, session_id, is_multilabel=False, user_id=user_id, exist_ok=True, is_instance=True
    )
    group = zarr.open_group(seg.zarr(), mode="w", zarr_format=3)  # our own earlier result, replaced
    chunks = tuple(min(_CHUNK, int(c)) for c in labels.chunksize)
    array = group.create_array(
        "0", shape=labels.shape, chunks=chunks, dtype=np.uint32, fill_value=0,
        compressors=(ZstdCodec(level=3),), chunk_key_encoding={"name": "v2", "separator": "/"},
        dimension_names=["z", "y", "x"],
    )
    da.store(labels.astype(np.uint32).rechunk(chunks), array, lock=False)
    write_image_metadata(group, levels=1, voxel_size=(vs, vs, vs), origin=None, name=seg.name, version="0.5")
    picks = run.new_picks(object_name, session_id, user_id=user_id, exist_ok=True)
    picks.from_numpy(_picks_positions(table, vs), instance_ids=np.asarray(table["label"], dtype=np.int64))
    return {
        "copick_segmentation": PurePosixPath(getattr(seg, "path", seg.name)),
        "copick_picks": PurePosixPath(getattr(picks, "path", object_name)),
    }

