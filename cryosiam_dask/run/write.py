"""Stage 4, outputs: CryoSiam's h5 + CSV, raw maps, OME-Zarr, MRC, STAR, each written atomically.

On a resumed run they are all rewritten: they are cheap next to the network and the instances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryosiam_dask import outputs as out
from cryosiam_dask.errors import CryoSiamDaskError, OutputError
from cryosiam_dask.outputs.atomic import _as_output_error
from cryosiam_dask.run.inputs import OpenedInput
from cryosiam_dask.run.maps import Maps
from cryosiam_dask.run.segment import Instances
from cryosiam_dask.run.settings import OutputSettings

__all__ = ["output_error", "write_outputs"]


def output_error(e: OSError, where: Path) -> OutputError:
    """One line for an OSError while writing: the writers' classification (disk full, not permitted) with the
    hint that a rerun resumes; any other error with its own text."""
    known = _as_output_error(e, where)
    if known is not None:
        return OutputError(f"{known}; free space or fix permissions and run again (it resumes)")
    text = e.strerror or str(e) or type(e).__name__
    return OutputError(f"writing {where} failed ({type(e).__name__}: {text})")


def _put(outputs: dict[str, Path], key: str, writer: Any, path: Path, *args: Any, **kwargs: Any) -> None:
    try:
        outputs[key] = writer(path, *args, **kwargs)
    except CryoSiamDaskError:
        raise
    except OSError as e:
        raise output_error(e, path) from e


def write_outputs(
    item: OpenedInput, maps: Maps, instances: Instances, settings: OutputSettings, raw_attrs: dict[str, Any]
) -> tuple[int, dict[str, Path]]:
    """Every output of one tomogram; returns (number of instances, {output name: path})."""
    folder, formats, stem = settings.prediction_folder, settings.formats, item.stem
    labels = instances.labels
    table = out.region_table(labels)
    n = int(len(table["label"]))
    written: dict[str, Path] = {}
    vs, origin = item.tomogram.voxel_size, item.tomogram.origin
    geometry = {"voxel_size": vs, "origin": origin}
    if "cryosiam" in formats:
        _put(written, "instances_h5", out.write_instances_h5, folder / f"{stem}_instance_preds.h5", labels,
             **geometry)
        _put(written, "regions_csv", out.write_regions_csv, folder / f"{stem}_instance_regions.csv", table)
    if (settings.save_raw_predictions or "raw" in formats) and not maps.raw_reused:
        _put(
            written,
            "raw_h5",
            out.write_raw_predictions_h5,
            folder / f"{stem}_preds.h5",
            *maps.arrays(),
            attrs=raw_attrs,
            **geometry,
        )
    if "ome-zarr" in formats:
        named = dict(zip(("foreground", "distances", "boundaries"), maps.arrays(), strict=True))
        _put(
            written,
            "ome_zarr",
            out.write_ome_zarr,
            folder / f"{stem}.ome.zarr",
            item.tomogram.data,
            labels,
            voxel_size=vs,
            origin=origin,
            maps=named,
        )
    if "mrc" in formats:
        _put(
            written,
            "mrc",
            out.write_mrc_labels,
            folder / f"{stem}_instances.mrc",
            labels,
            voxel_size=vs,
            max_label=n,
            origin=origin,
        )
    if "star" in formats:
        _put(
            written,
            "star",
            out.write_star,
            folder / f"{stem}_instances.star",
            table,
            voxel_size=vs[2],
            # a file's name, as CryoSiam's; a copick run or URL: its stem (the run name)
            tomogram_name=item.path.name if isinstance(item.path, Path) else item.stem,
        )
    if settings.copick is not None:
        from cryosiam_dask.outputs.copick import write_copick

        cp = settings.copick
        try:
            written.update(write_copick(item.path, labels, table, object_name=cp.object_name,
                                        user_id=cp.user_id, session_id=cp.session_id))
        except OSError as e:
            raise output_error(e, Path(item.path.name)) from e
    return n, written
