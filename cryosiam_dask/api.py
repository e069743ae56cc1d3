"""The notebook API: lazy dask arrays in, lazy dask arrays out (nothing runs until ``compute``/``persist``).

>>> import cryosiam_dask as csd
>>> fg, dist, bnd = csd.predict("TS_01.mrc", "cryosiam_instance.ckpt", tiling="exact")  # doctest: +SKIP
>>> labels = csd.segment(fg, dist, threshold_foreground=0.65)                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from cryosiam_dask._types import DEFAULT_CHUNKS
from cryosiam_dask.errors import ParameterError

__all__ = ["as_tomogram_array", "predict", "segment"]


def as_tomogram_array(
    tomogram: Any,
    *,
    chunk_size: tuple[int, int, int] = DEFAULT_CHUNKS,
    work_dir: str | os.PathLike | None = None,
) -> da.Array:
    """Return ``tomogram`` as a (Z, Y, X) dask array.

    Parameters
    ----------
    tomogram : path (.mrc/.rec/.zarr), zarr array, numpy array or dask array
        A path is opened with :func:`cryosiam_dask.io.tomograms.open_tomogram` (MRC converted to zarr in
        ``work_dir``,
        default: a ``.cryosiam_dask`` folder beside the file).
    chunk_size : (3,) tuple of int, default (128, 256, 256)
    """
    if isinstance(tomogram, da.Array):
        return tomogram
    if isinstance(tomogram, (str, os.PathLike)):
        from cryosiam_dask.io.tomograms import open_tomogram

        path = Path(tomogram)
        return open_tomogram(
            path, work_dir=work_dir or path.parent / ".cryosiam_dask", chunk_size=chunk_size
        ).data
    return da.from_array(tomogram, chunks=chunk_size)


def predict(
    tomogram: Any,
    checkpoint: str | os.PathLike,
    *,
    tiling: str = "exact",
    data: tuple[float, float, float | None, float | None] = (0.0, 1.0, 0.0, 1.0),
    batch_size: int = 2,
    mask: Any = None,
    device: str = "cpu",
    chunk_size: tuple[int, int, int] = DEFAULT_CHUNKS,
) -> tuple[da.Array, da.Array, da.Array]:
    """The network's maps of a tomogram as lazy dask arrays (nothing runs until ``compute``/``persist``).

    Parameters
    ----------
    tomogram : path, zarr array, numpy array or dask array, (Z, Y, X)
    checkpoint : path
        CryoSiam instance checkpoint.
    tiling : {"fast", "exact"}, default "exact"
    data : (min, max, mean, std), default (0, 1, 0, 1)
        CryoSiam's ``parameters.data``.
    batch_size : int, default 2
    mask : (Z, Y, X) array, optional
        Lamella mask factors (int8); maps are multiplied by it and empty chunks skip the network.
    device : {"cpu", "cuda"}, default "cpu"
    chunk_size : (3,) tuple of int, default (128, 256, 256)

    Returns
    -------
    foreground, distance, boundary : (Z, Y, X) dask.array.Array of float32
    """
    from cryosiam_dask.network.predict import predict_maps
    from cryosiam_dask.run.settings import user_error

    array = as_tomogram_array(tomogram, chunk_size=chunk_size)
    if mask is not None and not isinstance(mask, da.Array):
        mask = da.from_array(np.asarray(mask, dtype=np.int8), chunks=array.chunks)
    try:
        return predict_maps(
            array, checkpoint, tiling=tiling, data=data, batch_size=batch_size, mask=mask, device=device
        )
    except ParameterError as e:
        raise user_error(e) from e


def segment(foreground: Any, distance: Any, *, boundary: Any = None, **params: Any) -> da.Array:
    """CryoSiam's instances of the maps, as a dask array with global ids.

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask or numpy arrays of float32
        Network maps (:func:`predict`), already multiplied by the lamella mask.
    boundary : (Z, Y, X) dask or numpy array of float32, optional
        The boundary map; needed when ``postprocessing`` is True.
    **params
        The fields of :class:`~cryosiam_dask.instances.params.PostParams`: CryoSiam's ``parameters.network``
        keys (``threshold_foreground``, ``min_center_distance``, ``max_center_distance``, ``distance_type``,
        ``boundary_bias``, ``postprocessing``: the multicut) and the ``halo``, with CryoSiam's defaults.

    Returns
    -------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids 1..N, 0 = background, unique across the whole volume.

    Notes
    -----
    Not lazy throughout: the watershed windows (and the multicut's edge graph) are computed when this function
    is called, because the id table needs every window's keys; the returned labels are a lazy lookup of the
    kept keys, computed chunk by chunk.
    """
    from cryosiam_dask.instances.memory_store import segment_instances
    from cryosiam_dask.instances.params import PostParams
    from cryosiam_dask.run.settings import user_error

    fg = foreground if isinstance(foreground, da.Array) else da.from_array(foreground, chunks=DEFAULT_CHUNKS)
    dist = distance if isinstance(distance, da.Array) else da.from_array(distance, chunks=fg.chunks)
    try:
        p = PostParams.from_kwargs(**params)
        labels, _ = segment_instances(fg, dist, p)
        if p.multicut_on:
            from cryosiam_dask.instances.multicut import multicut_chunked

            if boundary is None:
                raise ParameterError("boundary", "is needed by the multicut (postprocessing=True)")
            bnd = boundary if isinstance(boundary, da.Array) else da.from_array(boundary, chunks=fg.chunks)
            labels, _ = multicut_chunked(labels.persist(), bnd, boundary_bias=p.boundary_bias)
    except ParameterError as e:
        raise user_error(e) from e
    return labels
