"""A local copick project made from MRC tomograms (and CryoSiam lamella masks), for tests and benchmarks.

Needs the ``copick`` extra. The project is a filesystem config (``overlay_root`` in the folder) with pickable
objects ``particle`` (label 1) and ``lamella`` (label 2); each run's tomogram is written with copick's own
``from_numpy`` (OME-Zarr 0.5, one shard), so it is laid out exactly as copick users' projects are.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

__all__ = ["write_copick_project"]


def write_copick_project(
    folder: str | os.PathLike,
    tomograms: dict[str, Path],
    *,
    masks: dict[str, np.ndarray] | None = None,
    voxel_size: float = 10.0,
    tomo_type: str = "denoised",
) -> Path:
    """Write a copick project under `folder`; return its config file.

    Parameters
    ----------
    folder : path
        Created; holds ``copick_config.json`` and the overlay root ``project/``.
    tomograms : dict of str to Path
        Run name -> MRC file; the volume (z, y, x) becomes the run's `tomo_type` tomogram at `voxel_size`.
    masks : dict of str to (Z, Y, X) ndarray, optional
        Run name -> lamella mask, written as a binary segmentation ``lamella`` (user ``annotator``,
        session ``1``).
    voxel_size : float, default 10.0
        Å.
    tomo_type : str, default "denoised"
    """
    from copick.models import PickableObject

    from cryosiam_dask.io.copick import import_copick

    copick = import_copick()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "copick_config.json"
    objects = [
        PickableObject(name="particle", is_particle=True, label=1, radius=60.0),
        PickableObject(name="lamella", is_particle=False, label=2),
    ]
    copick.new_config(str(config), overlay_root=str(folder / "project"), pickable_objects=objects)
    root = copick.from_file(str(config))
    for name, mrc in tomograms.items():
        with mrcfile.open(mrc, permissive=True) as f:
            volume = np.asarray(f.data, dtype=np.float32)
        run = root.new_run(name)
        run.new_voxel_spacing(voxel_size).new_tomogram(tomo_type).from_numpy(volume, levels=1)
        if masks and name in masks:
            seg = run.new_segmentation(voxel_size, "lamella", "1", is_multilabel=False, user_id="annotator")
            seg.from_numpy(np.asarray(masks[name]).astype(np.uint8))
    return config
