"""cryosiam_dask: CryoSiam-compatible instance segmentation of cryo-ET tomograms, chunked with dask.

Importing the package loads neither torch nor cupy/cucim/dask-cuda; they load when a stage needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
