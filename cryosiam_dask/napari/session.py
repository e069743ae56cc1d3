"""What the tuning widget works on, without Qt: a config's tomograms, their cached maps, a crop's instances.

The maps of a tomogram are those an earlier run left (``instance_predict`` with ``work_dir_cleanup: stale``,
the default, keeps them), looked for in this order:

1. ``<work_dir>/<stem>/maps-<key>.zarr`` whose every inference block is done (the most recent one, when
   earlier runs with other network settings left several; ``work_dir_cleanup: stale`` keeps only the last);
2. ``<prediction_folder>/<stem>_preds.h5`` (``save_raw_predictions``, or the ``raw`` output format);
3. ``<prediction_folder>/<stem>.ome.zarr/maps/`` (the ``ome-zarr`` output format).

All three hold the maps after the lamella mask, as the instance stage reads them. A config with
``semantic_predictions`` replaces the foreground as the run does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da

from cryosiam_dask.config import InstanceConfig, load_config
from cryosiam_dask.errors import InputFileError
from cryosiam_dask.instances.crop import CropResult, segment_crop
from cryosiam_dask.instances.params import PostParams

__all__ = ["CachedMaps", "TuningSession", "find_maps"]


@dataclass
class CachedMaps:
    """A tomogram's three maps, (Z, Y, X) float32 arrays read region by region, and where they are."""

    foreground: Any
    distance: Any
    boundary: Any
    source: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        return tuple(int(s) for s in self.foreground.shape)  # type: ignore[return-value]


def _work_dir_maps(work_dir: Path, stem: str) -> CachedMaps | None:
    import zarr

    stores = [p for p in (work_dir / stem).glob("maps-*.zarr")
              if (p.with_name(p.name + ".done") / "maps" / "complete").is_file()]
    for store in sorted(stores, key=lambda p: p.stat().st_mtime, reverse=True):
        group = zarr.open_group(str(store), mode="r")
        return CachedMaps(group["foreground"], group["distance"], group["boundary"], store)
    return None


def _h5_maps(path: Path) -> CachedMaps | None:
    import h5py

    from cryosiam_dask.outputs.cryosiam import MAP_DATASETS

    if not path.is_file():
        return None
    f = h5py.File(path, "r")  # kept open: the datasets are read region by region
    if any(name not in f for name in MAP_DATASETS):
        f.close()
        return None
    return CachedMaps(*(f[name] for name in MAP_DATASETS), path)


def _ome_maps(path: Path) -> CachedMaps | None:
    import zarr

    if not (path / "maps").is_dir():
        return None
    group = zarr.open_group(str(path), mode="r")["maps"]
    try:
        return CachedMaps(*(group[f"{name}/0"] for name in ("foreground", "distances", "boundaries")), path)
    except KeyError:
        return None


def find_maps(config: InstanceConfig, stem: str) -> CachedMaps | None:
    """The cached maps of `stem` (see the module's order), or None when no run has left them."""
    folder = config.prediction_folder
    for found in (
        _work_dir_maps(config.work_dir, stem),
        _h5_maps(folder / f"{stem}_preds.h5"),
        _ome_maps(folder / f"{stem}.ome.zarr"),
    ):
        if found is not None:
            return found
    return None


class TuningSession:
    """A config, its tomograms and, once loaded, one tomogram's cached maps: the tuning widget's model.

    Parameters
    ----------
    config : str or PathLike
        A CryoSiam instance YAML (validated with :func:`~cryosiam_dask.config.load_config`).
    """

    def __init__(self, config: str | os.PathLike[str]) -> None:
        self.path = Path(config)
        self.config = load_config(self.path)
        self.maps: CachedMaps | None = None
        self.stem: str | None = None
        self._tomograms: dict[str, Any] | None = None

    def tomograms(self) -> dict[str, Any]:
        """The config's tomograms by stem, as the run takes them: paths (``data_folder`` + ``test_files``),
        or copick runs and OME-Zarr URLs (references read in place)."""
        if self._tomograms is None:
            self._tomograms = {self.config.stem(p): p for p in self.config.input_files()}
        return self._tomograms

    def tomogram_layer(self, stem: str) -> tuple[da.Array, dict[str, Any]]:
        """The tomogram, lazily, and napari kwargs (name, scale = voxel size, translate = origin, Å)."""
        path = self.tomograms()[stem]
        if isinstance(path, Path) and path.suffix != ".zarr":  # MRC/REC: memory-mapped, no conversion
            import mrcfile

            from cryosiam_dask.io.mrc import check_tomogram

            info = check_tomogram(path)
            voxel, origin = info.voxel_size, info.origin
            data = da.from_array(mrcfile.mmap(path, mode="r", permissive=True).data, chunks="auto")
        else:  # a zarr, a copick run or an OME-Zarr URL: read in place, as the run reads it
            from cryosiam_dask.io.tomograms import open_tomogram

            tomo = open_tomogram(path, work_dir=self.config.work_dir,
                                 chunk_size=tuple(self.config.cryosiam_dask.chunk_size))
            data, voxel, origin = tomo.data, tomo.voxel_size, tomo.origin
        voxel = tuple(v if v > 0 else 1.0 for v in voxel)
        return data, {"name": stem, "scale": voxel, "translate": tuple(origin)}

    def load(self, stem: str) -> CachedMaps:
        """Find `stem`'s cached maps; InputFileError naming what to run when there are none."""
        maps = find_maps(self.config, stem)
        if maps is None:
            raise InputFileError(
                f"{stem}: no cached maps in {self.config.work_dir / stem} or "
                f"{self.config.prediction_folder}; "
                f"run instance_predict once (the Run widget, or cryosiam_dask instance_predict "
                f"--config_file={self.path} --filename {self.tomograms()[stem].name})"
            )
        if self.config.semantic_predictions is not None:
            from cryosiam_dask.io.semantic import semantic_foreground

            fg = da.from_array(maps.foreground, chunks=tuple(self.config.cryosiam_dask.chunk_size))
            path = self.config.semantic_predictions / f"{stem}_preds.h5"
            labels = tuple(self.config.semantic_foreground_labels or ())
            fg = semantic_foreground(path, labels, fg)
            maps = CachedMaps(fg, maps.distance, maps.boundary, maps.source)
        self.maps, self.stem = maps, stem
        return maps

    def params(self, **changes: Any) -> PostParams:
        """The config's post-processing with `changes` (CryoSiam's key names); its halo is the config's."""
        from dataclasses import replace

        return replace(self.config.post_params, **changes)

    def segment(self, crop: Any, params: PostParams) -> CropResult:
        """The instances of `crop` (z, y, x (start, stop) pairs, voxels) under `params`, from the maps."""
        if self.maps is None:
            raise InputFileError("no tomogram loaded: load one first")
        m = self.maps
        return segment_crop(m.foreground, m.distance, crop, params, boundary=m.boundary)
