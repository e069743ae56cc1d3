"""``instance_predict``: CryoSiam's instance prediction for every tomogram of a config, and the notebook API.

:func:`instance_predict` validates every input before any graph is built, locks the output stems, starts (or
attaches to) the cluster and runs the stages of :mod:`cryosiam_dask.stages`. :func:`predict` and
:func:`segment` return lazy dask arrays for notebooks.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from cryosiam_dask import _resume
from cryosiam_dask.config import InstanceConfig
from cryosiam_dask.errors import NotSupportedError, OutputError
from cryosiam_dask.stages import NOT_SUPPORTED_MULTICUT, TomogramResult, run_stages

logger = logging.getLogger(__name__)

__all__ = ["TomogramResult", "instance_predict", "predict", "run_stages", "segment", "validate"]


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cryosiam_dask_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"prediction_folder {folder} is not writable ({e.strerror or e})") from e


def validate(config: InstanceConfig, *, filename: str | None = None) -> list[Path]:
    """Check everything a run needs before any dask graph is built; return the tomograms to process.

    Raises a one-line :class:`~cryosiam_dask.errors.CryoSiamDaskError` for a missing or bad input file, mask,
    checkpoint, unsupported option or unwritable prediction folder.
    """
    from cryosiam_dask.io import check_tomogram
    from cryosiam_dask.model import build_model, load_checkpoint

    if config.parameters.network.postprocessing:
        raise NotSupportedError(NOT_SUPPORTED_MULTICUT)
    files = config.validate_paths(filename)
    for f in files:
        if f.suffix != ".zarr":
            check_tomogram(f)
    build_model(load_checkpoint(config.checkpoint_path))  # every inference-path tensor present and shaped
    _check_writable(config.prediction_folder)
    return files


def _add_log_file(config: InstanceConfig) -> logging.Handler | None:
    folder = config.log_dir or config.prediction_folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(
            folder / f"cryosiam_dask_instance_predict_{time.strftime('%Y%m%d-%H%M%S')}.log"
        )
    except OSError as e:
        logger.warning("cannot write a log file in %s (%s)", folder, e)
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    pkg = logging.getLogger("cryosiam_dask")
    pkg.addHandler(handler)
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    return handler


def instance_predict(
    config: InstanceConfig, *, filename: str | None = None, client: Any = None, processes: bool = True
) -> list[TomogramResult]:
    """CryoSiam's ``instance_predict`` for every tomogram of ``config`` (or only ``filename``).

    Parameters
    ----------
    config : InstanceConfig
        From :func:`cryosiam_dask.config.load_config` (CryoSiam's YAML + the optional ``cryosiam_dask``).
    filename : str, optional
        Process only this tomogram (CryoSiam's ``--filename``).
    client : distributed.Client, optional
        Use this client; otherwise the cluster of ``cryosiam_dask`` settings is started (or attached to) and
        closed at the end.
    processes : bool, default True
        For a local CPU cluster started here: worker processes (True) or threads in this process (False).

    Returns
    -------
    list of TomogramResult
        One per tomogram: instance count, output paths, report (skipped chunks, oversized objects, timings).
    """
    from cryosiam_dask.cluster import plan_cluster, resolve_device, start_client

    files = validate(config, filename=filename)
    s = config.cryosiam_dask
    device = resolve_device(s.device)
    locks: list[Path] = []
    try:
        for f in files:
            locks.append(_resume.acquire_lock(config.prediction_folder, config.stem(f)))
    except BaseException:
        for lock in locks:
            _resume.release_lock(lock)
        raise
    handler = _add_log_file(config)
    try:
        logger.info(
            "instance_predict: %d tomogram(s), device %s, tiling %s, chunks %s, halo %d",
            len(files),
            device,
            s.tiling,
            tuple(s.chunk_size),
            s.halo,
        )
        if client is not None:
            return run_stages(config, files, device=device)
        plan = plan_cluster(
            device=device,
            scheduler_address=s.scheduler_address,
            n_workers=s.n_workers,
            threads_per_worker=s.threads_per_worker,
            memory_limit=s.memory_limit,
            gpu_devices=config.parameters.gpu_devices,
            dashboard_address=s.dashboard_address,
        )
        with start_client(plan, processes=processes):
            return run_stages(config, files, device=device)
    finally:
        if handler is not None:
            logging.getLogger("cryosiam_dask").removeHandler(handler)
            handler.close()
        for lock in locks:
            _resume.release_lock(lock)


# --- Python API for notebooks: lazy dask arrays in, lazy dask arrays out ---


def as_tomogram_array(
    tomogram: Any,
    *,
    chunk_size: tuple[int, int, int] = (128, 256, 256),
    work_dir: str | os.PathLike | None = None,
) -> da.Array:
    """Return ``tomogram`` as a (Z, Y, X) dask array.

    Parameters
    ----------
    tomogram : path (.mrc/.rec/.zarr), zarr array, numpy array or dask array
        A path is opened with :func:`cryosiam_dask.io.open_tomogram` (MRC converted to zarr in ``work_dir``,
        default: a ``.cryosiam_dask`` folder beside the file).
    chunk_size : (3,) tuple of int, default (128, 256, 256)
    """
    if isinstance(tomogram, da.Array):
        return tomogram
    if isinstance(tomogram, (str, os.PathLike)):
        from cryosiam_dask.io import open_tomogram

        path = Path(tomogram)
        return open_tomogram(
            path, work_dir=work_dir or path.parent / ".cryosiam_dask", chunk_size=chunk_size
        ).data
    return da.from_array(tomogram, chunks=chunk_size)


def predict(
    tomogram: Any,
    checkpoint: str | os.PathLike,
    *,
    tiling: str = "fast",
    data: tuple[float, float, float | None, float | None] = (0.0, 1.0, 0.0, 1.0),
    batch_size: int = 2,
    mask: Any = None,
    device: str = "cpu",
    chunk_size: tuple[int, int, int] = (128, 256, 256),
) -> tuple[da.Array, da.Array, da.Array]:
    """The network's maps of a tomogram as lazy dask arrays (nothing runs until ``compute``/``persist``).

    Parameters
    ----------
    tomogram : path, zarr array, numpy array or dask array, (Z, Y, X)
    checkpoint : path
        CryoSiam instance checkpoint.
    tiling : {"fast", "exact"}, default "fast"
    data : (min, max, mean, std), default (0, 1, 0, 1)
        CryoSiam's ``parameters.data``.
    batch_size : int, default 2
    mask : (Z, Y, X) array, optional
        Lamella mask factors (int8); maps are multiplied by it and empty chunks skip the network.
    device : {"cpu", "cuda"}, default "cpu"
    chunk_size : (3,) tuple of int, default (128, 256, 256)

    Returns
    -------
    foreground, distance, boundary : (Z, Y, X) dask.array.Array of float32
    """
    from cryosiam_dask.inference import predict_maps

    array = as_tomogram_array(tomogram, chunk_size=chunk_size)
    if mask is not None and not isinstance(mask, da.Array):
        mask = da.from_array(np.asarray(mask, dtype=np.int8), chunks=array.chunks)
    return predict_maps(
        array, checkpoint, tiling=tiling, data=data, batch_size=batch_size, mask=mask, device=device
    )


def segment(
    foreground: Any,
    distance: Any,
    *,
    threshold_foreground: float = 0.65,
    min_center_distance: float = 1,
    max_center_distance: float = 4,
    distance_type: int = 1,
    halo: int = 32,
) -> da.Array:
    """CryoSiam's seeded-watershed instances of the maps, as a lazy dask array with global ids.

    Parameters
    ----------
    foreground, distance : (Z, Y, X) dask or numpy arrays of float32
        Network maps (:func:`predict`), already multiplied by the lamella mask.
    threshold_foreground, min_center_distance, max_center_distance, distance_type
        CryoSiam's ``parameters.network`` keys, with their real meaning (see the README's config reference).
    halo : int, default 32

    Returns
    -------
    labels : (Z, Y, X) dask.array.Array of uint32
        Instance ids 1..N, 0 = background, unique across the whole volume.
    """
    from cryosiam_dask.merge import segment_instances

    fg = foreground if isinstance(foreground, da.Array) else da.from_array(foreground, chunks=(128, 256, 256))
    dist = distance if isinstance(distance, da.Array) else da.from_array(distance, chunks=fg.chunks)
    labels, _ = segment_instances(
        fg,
        dist,
        threshold_min=min_center_distance,
        threshold_max=max_center_distance,
        assignment_threshold=threshold_foreground,
        distance_type=distance_type,
        halo=halo,
    )
    return labels
