"""CryoSiam's post-processing parameters, their defaults and their checks, written once.

The API (:func:`cryosiam_dask.segment`), the whole-volume reference, the chunked algorithm and the run layer
all take a :class:`PostParams`; the config builds one when it is loaded, so a bad value stops the run before
any work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cryosiam_dask.errors import ParameterError

__all__ = ["PostParams", "margin_for"]


def margin_for(distance_type: int) -> int:
    """Width (voxels) of the band at a cut window face where the window's maps may differ from the volume's.

    2 for the Gaussians, + 5 for the clipped EDT + 2 for its blur (types 1 and 2), + 1 so that a trusted
    component's neighbours are exact too.
    """
    return 9 if distance_type in (1, 2) else 3


@dataclass(frozen=True)
class PostParams:
    """The post-processing of the network maps into instances (CryoSiam's ``parameters.network`` keys).

    Defaults are those of CryoSiam's ``instance_segmentation`` function (the config requires each key).

    Attributes
    ----------
    threshold_foreground : float, default 0.4
        T: voxels whose (smoothed, if T < 1) foreground is >= T are flooded.
    min_center_distance, max_center_distance : float, defaults 0 and 5
        Distance levels (voxels) of the markers (CryoSiam's ``threshold_min`` / ``threshold_max``).
    distance_type : {0, 1, 2}, default 0
        0: predicted distance; 1: mean of it and the blurred, clipped EDT of fg >= T; 2: that EDT only.
    boundary_bias : float, default 0.45
        The multicut's beta; 1 skips the multicut, as in CryoSiam.
    postprocessing : bool, default False
        Run CryoSiam's multicut after the watershed.
    halo : int, default 32
        Context voxels around each chunk for the chunked watershed; must exceed :func:`margin_for`.
    """

    threshold_foreground: float = 0.4
    min_center_distance: float = 0.0
    max_center_distance: float = 5.0
    distance_type: int = 0
    boundary_bias: float = 0.45
    postprocessing: bool = False
    halo: int = 32

    def __post_init__(self) -> None:
        for name in ("threshold_foreground", "min_center_distance", "max_center_distance", "boundary_bias"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ParameterError(name, f"must be a finite number, got {v!r}")
        if self.distance_type not in (0, 1, 2) or isinstance(self.distance_type, bool):
            raise ParameterError("distance_type", f"must be 0, 1 or 2, got {self.distance_type!r}")
        if not isinstance(self.halo, int) or isinstance(self.halo, bool) or self.halo < 0:
            raise ParameterError("halo", f"must be an integer >= 0, got {self.halo!r}")
        if self.halo <= self.margin:
            raise ParameterError(
                "halo",
                f"is {self.halo} but must exceed {self.margin} (the reach of the smoothing and EDT of "
                f"distance_type {self.distance_type}) so that chunks give the whole volume's instances",
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> PostParams:
        """Build from keyword arguments; an unknown name is a :class:`ParameterError` naming it."""
        names = set(cls.__dataclass_fields__)
        for name in kwargs:
            if name not in names:
                raise ParameterError(name, f"is not a post-processing parameter (one of {sorted(names)})")
        return cls(**kwargs)

    @property
    def margin(self) -> int:
        """:func:`margin_for` this distance type."""
        return margin_for(self.distance_type)

    @property
    def multicut_on(self) -> bool:
        """Whether CryoSiam runs its multicut: ``postprocessing`` and a bias other than 1."""
        return bool(self.postprocessing) and self.boundary_bias != 1

    def watershed_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~cryosiam_dask.instances.block.segment_block`."""
        keys = ("threshold_foreground", "min_center_distance", "max_center_distance", "distance_type")
        return {k: v for k, v in asdict(self).items() if k in keys}
