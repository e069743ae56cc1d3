"""Inputs: tomograms (MRC/REC -> OME-Zarr, zarr in place), lamella masks, and OME-Zarr metadata."""

from cryosiam_dask.io.masks import read_mask, resize_mask
from cryosiam_dask.io.tomograms import Tomogram, check_tomogram, open_tomogram, stem_of, tomogram_to_zarr

__all__ = ["Tomogram", "check_tomogram", "open_tomogram", "read_mask", "resize_mask", "stem_of",
           "tomogram_to_zarr"]
