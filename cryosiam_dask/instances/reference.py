"""CryoSiam's ``instance_segmentation`` on a whole volume in memory: the reference the chunked path equals."""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.block import segment_block
from cryosiam_dask.instances.params import PostParams

__all__ = ["ORIGINAL_NAMES", "from_original_kwargs", "instance_segmentation"]

ORIGINAL_NAMES = {
    "threshold_min": "min_center_distance",
    "threshold_max": "max_center_distance",
    "assignment_threshold": "threshold_foreground",
}
"""CryoSiam's ``instance_segmentation`` keyword -> ours (the config's key names, used package-wide)."""


def from_original_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Translate the keyword arguments of a call to CryoSiam's ``instance_segmentation`` into ours."""
    return {ORIGINAL_NAMES.get(k, k): v for k, v in kwargs.items()}


def instance_segmentation(
    foreground: np.ndarray, distance: np.ndarray, boundary: np.ndarray | None = None, **params: Any
) -> np.ndarray:
    """CryoSiam's post-processing of the three network maps into instances, on the whole volume in memory.

    Parameters
    ----------
    foreground : (Z, Y, X) numpy.ndarray of float32
        Foreground probability (after the lamella mask).
    distance : (Z, Y, X) numpy.ndarray of float32
        Raw distance regression.
    boundary : (Z, Y, X) numpy.ndarray of float32 or None
        Boundary probability; only the multicut (``postprocessing=True``) uses it.
    **params
        The fields of :class:`~cryosiam_dask.instances.params.PostParams` (``threshold_foreground``,
        ``min_center_distance``, ``max_center_distance``, ``distance_type``, ``boundary_bias``,
        ``postprocessing``), with its defaults (CryoSiam's ``instance_segmentation`` defaults); ``halo`` is
        not used on the whole volume.

    Returns
    -------
    (Z, Y, X) numpy.ndarray of uint32
        Instance ids (0 = background), exactly CryoSiam's ids: by vanishing level, then raster order.

    Examples
    --------
    >>> fg = np.zeros((9, 9, 9), np.float32); fg[2:7, 2:7, 2:7] = 1
    >>> lab = instance_segmentation(fg, fg * 3, min_center_distance=1, max_center_distance=2,
    ...                             threshold_foreground=0.5, distance_type=1)
    >>> int(lab.max())
    1
    """
    p = PostParams.from_kwargs(**params)
    foreground, distance = np.asarray(foreground), np.asarray(distance)
    if foreground.shape != distance.shape or foreground.ndim != 3:
        raise ParameterError(
            "foreground", f"{foreground.shape} and distance {distance.shape} must be 3-d arrays of one shape"
        )
    labels = segment_block(foreground, distance, **p.watershed_kwargs())[0].astype(np.uint32)
    if p.multicut_on:
        from cryosiam_dask.instances.multicut import multicut_postprocess

        if boundary is None:
            raise ParameterError("boundary", "is needed by the multicut (postprocessing=True)")
        labels = multicut_postprocess(labels, np.asarray(boundary), boundary_bias=p.boundary_bias)
    return labels
