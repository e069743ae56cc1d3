"""cryosiam_dask: CryoSiam-compatible instance segmentation of cryo-ET tomograms, chunked with dask.

Importing the package loads neither torch nor cupy/cucim/dask-cuda; the public functions below are loaded on
first use.

Examples
--------
>>> import cryosiam_dask as csd
>>> cfg = csd.load_config("configs/config_instance.yaml")          # doctest: +SKIP
>>> results = csd.instance_predict(cfg)                             # doctest: +SKIP
>>> fg, dist, bnd = csd.predict("TS_01.mrc", "cryosiam_instance.ckpt")  # lazy dask arrays  # doctest: +SKIP
>>> labels = csd.segment(fg, dist, threshold_foreground=0.65)       # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": "cryosiam_dask.config",
    "InstanceConfig": "cryosiam_dask.config",
    "instance_predict": "cryosiam_dask.run.driver",
    "predict": "cryosiam_dask.api",
    "segment": "cryosiam_dask.api",
    "open_tomogram": "cryosiam_dask.io.tomograms",
    "tomogram_to_zarr": "cryosiam_dask.io.tomograms",
    "region_table": "cryosiam_dask.outputs.regions",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cryosiam_dask' has no attribute {name!r}")
