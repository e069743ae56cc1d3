"""CryoSiam's ``instance_segmentation`` on a whole volume in memory: the reference the chunked path equals."""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.block import segment_block
from cryosiam_dask.instances.merge import check_parameters

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
    foreground: np.ndarray,
    distance: np.ndarray,
    boundary: np.ndarray | None = None,
    *,
    min_center_distance: float = 0,
    max_center_distance: float = 5,
    boundary_bias: float = 0.45,
    threshold_foreground: float = 0.4,
    distance_type: int = 0,
    postprocessing: bool = False,
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
    min_center_distance, max_center_distance : float, defaults 0 and 5
        Distance levels in voxels for the markers (CryoSiam's ``threshold_min``, ``threshold_max``).
    boundary_bias : float, default 0.45
        Multicut bias; unused on the watershed path.
    threshold_foreground : float, default 0.4
        T (CryoSiam's ``assignment_threshold``): voxels with (smoothed, if T < 1) fg >= T are flooded.
    distance_type : int, default 0
        0: predicted distance; 1: mean of it and the blurred, clipped EDT of fg >= T; 2: that EDT only.
    postprocessing : bool, default False
        CryoSiam's multicut after the watershed (:mod:`cryosiam_dask.instances.multicut`; needs the
        ``multicut`` extra); skipped when ``boundary_bias == 1``, as in the original.

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
    check_parameters(min_center_distance, max_center_distance)
    if not isinstance(distance_type, (int, np.integer)):
        raise ParameterError("distance_type", f"must be an integer, got {distance_type!r}")
    foreground, distance = np.asarray(foreground), np.asarray(distance)
    if foreground.shape != distance.shape or foreground.ndim != 3:
        raise ParameterError(
            "foreground", f"{foreground.shape} and distance {distance.shape} must be 3-d arrays of one shape"
        )
    labels = segment_block(
        foreground,
        distance,
        min_center_distance=min_center_distance,
        max_center_distance=max_center_distance,
        threshold_foreground=threshold_foreground,
        distance_type=distance_type,
    )[0]
    labels = labels.astype(np.uint32)
    if postprocessing and boundary_bias != 1:
        from cryosiam_dask.instances.multicut import multicut_postprocess

        if boundary is None:
            raise ParameterError("boundary", "is needed by the multicut (postprocessing=True)")
        labels = multicut_postprocess(labels, np.asarray(boundary), boundary_bias=boundary_bias)
    return labels
