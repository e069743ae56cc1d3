"""``instance_predict``: CryoSiam's instance prediction for every tomogram of a config.

:func:`instance_predict` validates every input before any graph is built, builds the stages' settings once
(:mod:`cryosiam_dask.run.settings`), locks the output stems, starts (or attaches to) the cluster and runs the
stages of :mod:`cryosiam_dask.run.stages`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.config import InstanceConfig
from cryosiam_dask.errors import OutputError
from cryosiam_dask.run.locks import acquire_lock, release_lock
from cryosiam_dask.run.settings import RunSettings
from cryosiam_dask.run.stages import TomogramResult, run_stages

logger = logging.getLogger(__name__)

__all__ = ["TomogramResult", "instance_predict", "validate"]




def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cryosiam_dask_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"prediction_folder {folder} is not writable ({e.strerror or e})") from e


def validate(config: InstanceConfig, *, filename: str | None = None) -> tuple[list[Path], ShapeZYX]:
    """Check everything a run needs before any dask graph is built.

    Returns the tomograms to process and the checkpoint's patch size (the checkpoint is read once, here).

    Raises a one-line :class:`~cryosiam_dask.errors.CryoSiamDaskError` for a missing or bad input file, mask,
    checkpoint, unsupported option or unwritable prediction folder.
    """
    from cryosiam_dask.io.tomograms import check_tomogram
    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model

    network = config.parameters.network
    if network.postprocessing and network.boundary_bias != 1:
        from cryosiam_dask.instances.multicut import check_multicut_available

        check_multicut_available()  # before any work: a missing extra names itself in one line
    files = config.validate_paths(filename)
    for f in files:
        if f.suffix != ".zarr":
            check_tomogram(f)
    ckpt = load_checkpoint(config.checkpoint_path)
    build_model(ckpt)  # every inference-path tensor present and shaped
    _check_writable(config.prediction_folder)
    return files, patch_size_of(ckpt)


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
    from cryosiam_dask.run.cluster import plan_cluster, resolve_device, start_client

    files, patch_size = validate(config, filename=filename)
    s = config.cryosiam_dask
    device = resolve_device(s.device)
    locks: list[Path] = []
    try:
        for f in files:
            locks.append(acquire_lock(config.prediction_folder, config.stem(f)))
    except BaseException:
        for lock in locks:
            release_lock(lock)
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
        settings = RunSettings.from_config(config, device=device, patch_size=patch_size)
        pairs = [(f, config.stem(f)) for f in files]
        if client is not None:
            return run_stages(settings, pairs)
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
            return run_stages(settings, pairs)
    finally:
        if handler is not None:
            logging.getLogger("cryosiam_dask").removeHandler(handler)
            handler.close()
        for lock in locks:
            release_lock(lock)
