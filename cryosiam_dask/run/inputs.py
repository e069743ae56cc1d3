"""Stage 1, inputs: every tomogram opened (MRC/REC converted to zarr, reused when up to date) and its mask.

NaN/inf voxels are refused (count and file named), not repaired; constant or mis-scaled input is warned about.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from cryosiam_dask.errors import InputFileError
from cryosiam_dask.io.masks import mask_array, mask_reader
from cryosiam_dask.io.tomograms import Tomogram, open_tomogram
from cryosiam_dask.run.progress import DEFAULT_LANE, Lane
from cryosiam_dask.run.settings import InputSettings

logger = logging.getLogger(__name__)

__all__ = ["OpenedInput", "open_inputs"]


@dataclass(frozen=True)
class OpenedInput:
    """One tomogram ready for the maps stage.

    Attributes
    ----------
    path : Path or reference
        The input file, or a URL / copick reference read in place (``.name`` names it).
    stem : str
        Output stem (CryoSiam's: the name cut at ``file_extension``).
    tomogram : Tomogram
        ``tomogram.data`` is (Z, Y, X), chunked like the run's ``chunk_size``.
    mask : (Z, Y, X) dask.array.Array of int8 or None
        The lamella mask, resized as CryoSiam does.
    mask_reader : object or None
        The same mask readable by region (``mask_reader[z0:z1, y0:y1, x0:x1]``), for tasks that read their own
        region (:func:`~cryosiam_dask.io.masks.mask_reader`).
    value_range : (float, float)
        Minimum and maximum voxel value.
    """

    path: Path | Any
    stem: str
    tomogram: Tomogram
    mask: da.Array | None
    value_range: tuple[float, float]
    mask_reader: Any = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The tomogram's (Z, Y, X) shape."""
        return tuple(int(n) for n in self.tomogram.data.shape)  # type: ignore[return-value]


def _warn_range(path: Path, lo: float, hi: float, data_min: float | None, data_max: float | None) -> None:
    if data_min is None or data_max is None:
        return
    span = data_max - data_min
    if span > 0 and (lo < data_min - 2 * span or hi > data_max + 2 * span):
        logger.warning(
            "%s: values span [%.4g, %.4g] but parameters.data min/max are [%g, %g]: CryoSiam clips to that "
            "range and then finds nothing; feed the denoised, [0, 1]-scaled tomogram (denoise_predict) "
            "or set parameters.data.min/max to the tomogram's range",
            path.name,
            lo,
            hi,
            data_min,
            data_max,
        )


def _value_checks(x: da.Array) -> tuple[Any, Any, Any]:
    if np.issubdtype(x.dtype, np.floating):
        ok = da.isfinite(x)
        return (~ok).sum(), da.where(ok, x, np.inf).min(), da.where(ok, x, -np.inf).max()
    return 0, x.min(), x.max()


def open_inputs(
    files: list[tuple[Path, str]], settings: InputSettings, lane: Lane = DEFAULT_LANE
) -> list[OpenedInput]:
    """Open every ``(path, stem)`` of `files` and check their values in one dask pass.

    Raises
    ------
    InputFileError
        A tomogram has NaN/inf voxels, or a tomogram or mask cannot be read.
    """
    opened = []
    for path, stem in files:
        tomo = open_tomogram(
            path,
            work_dir=settings.work_dir,
            chunk_size=settings.chunk_size,
            file_extension=settings.file_extension,
        )
        shape = tuple(int(n) for n in tomo.data.shape)
        own = getattr(path, "mask_reader", None)  # a copick run's lamella segmentation
        reader = own(shape) if own is not None else None
        if reader is None:
            reader = mask_reader(settings.mask_folder, stem, shape)
        opened.append((path, stem, tomo, reader))
    results = []
    checks = lane.compute(*[_value_checks(t.data) for _, _, t, _ in opened])
    for (path, stem, tomo, reader), (bad, lo, hi) in zip(opened, checks, strict=True):
        if int(bad):
            where = path if isinstance(path, Path) else path.name
            raise InputFileError(
                f"{where}: {int(bad)} NaN/inf voxel(s) of {int(np.prod(tomo.data.shape))}; replace them "
                "(e.g. numpy.nan_to_num with the tomogram's mean) and run again"
            )
        lo, hi = float(lo), float(hi)
        if lo == hi:
            logger.warning("%s: constant tomogram (every voxel %g): no instances can be found", path.name, lo)
        _warn_range(path, lo, hi, settings.data_min, settings.data_max)
        mask = None if reader is None else mask_array(reader, stem, chunks=settings.chunk_size)
        results.append(OpenedInput(path, stem, tomo, mask, (lo, hi), reader))
    return results
