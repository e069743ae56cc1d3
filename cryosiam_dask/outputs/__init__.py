"""Every output of ``instance_predict``, written chunk by chunk and atomically (the writers' public door).

- :mod:`~cryosiam_dask.outputs.cryosiam`: CryoSiam's ``<stem>_instance_preds.h5`` and ``<stem>_preds.h5``;
- :mod:`~cryosiam_dask.outputs.regions`: the region table and ``<stem>_instance_regions.csv``;
- :mod:`~cryosiam_dask.outputs.ome_zarr`: ``<stem>.ome.zarr`` (tomogram, instances, maps) for napari;
- :mod:`~cryosiam_dask.outputs.formats`: ``<stem>_instances.mrc`` and ``<stem>_instances.star``;
- :mod:`~cryosiam_dask.outputs.atomic`: write to a hidden sibling, rename when complete.
"""

from cryosiam_dask.outputs.atomic import atomic_output
from cryosiam_dask.outputs.cryosiam import (
    FINGERPRINT_ATTR,
    MAP_DATASETS,
    read_raw_predictions,
    write_instances_h5,
    write_raw_predictions_h5,
)
from cryosiam_dask.outputs.formats import write_mrc_labels, write_star
from cryosiam_dask.outputs.ome_zarr import write_ome_zarr
from cryosiam_dask.outputs.regions import REGION_COLUMNS, region_table, write_regions_csv

__all__ = [
    "FINGERPRINT_ATTR",
    "MAP_DATASETS",
    "REGION_COLUMNS",
    "atomic_output",
    "read_raw_predictions",
    "region_table",
    "write_instances_h5",
    "write_mrc_labels",
    "write_ome_zarr",
    "write_raw_predictions_h5",
    "write_regions_csv",
    "write_star",
]
