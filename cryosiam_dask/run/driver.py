"""``instance_predict``: CryoSiam's instance prediction for every tomogram of a config.

:func:`instance_predict` validates every input before any graph is built, builds the stages' settings once
(:mod:`cryosiam_dask.run.settings`), locks the output stems, starts (or attaches to) the cluster and runs the
stages of :mod:`cryosiam_dask.run.stages`. A failure ends the run with one line
(:mod:`cryosiam_dask.run.failures`; its traceback goes to the run's log file); after a successful run the
stale stores of its stems are collected (``cryosiam_dask.work_dir_cleanup``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.config import InstanceConfig
from cryosiam_dask.errors import ClusterError, InputFileError, OutputError, TaskError, TomogramsFailed
from cryosiam_dask.run import resume
from cryosiam_dask.run.locks import WorkDirLock, acquire_lock, hold_work_dir, release_lock, try_exclusive
from cryosiam_dask.run.settings import ClusterSettings, RunSettings
from cryosiam_dask.run.stages import RunSummary, TomogramResult, run_dataset

logger = logging.getLogger(__name__)

__all__ = ["TomogramResult", "collect_stale_stores", "instance_predict", "validate"]


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
    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model

    if config.post_params.multicut_on:
        from cryosiam_dask.instances.multicut import check_multicut_available

        check_multicut_available()  # before any work: a broken install names bioimage-cpp in one line
    files = config.validate_paths(filename)
    _check_inputs(config, files)
    ckpt = load_checkpoint(config.checkpoint_path)
    build_model(ckpt)  # every inference-path tensor present and shaped
    _check_writable(config.prediction_folder)
    return files, patch_size_of(ckpt)


def _check_inputs(config: InstanceConfig, files: list[Path]) -> None:
    """Every tomogram's header and every lamella mask's presence; one error naming every bad file."""
    from cryosiam_dask.io.masks import find_mask
    from cryosiam_dask.io.tomograms import check_tomogram

    problems = []
    for f in files:
        try:
            if isinstance(f, Path) and f.suffix != ".zarr":  # URL and copick references: checked on open
                check_tomogram(f)
            if config.mask_folder is not None and getattr(f, "lamella", None) is None:  # copick: its own
                find_mask(config.mask_folder, config.stem(f))
        except InputFileError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise InputFileError(problems[0])
    if problems:
        raise InputFileError(f"{len(problems)} of {len(files)} tomograms have bad input files: "
                             + "; ".join(problems))


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


def _log_traceback(handler: logging.Handler | None, error: BaseException) -> None:
    """Write the traceback of a failed run's cause into the log file only (stderr shows one line)."""
    cause = error.__cause__ or error
    if handler is None:
        return
    record = logging.LogRecord(
        "cryosiam_dask.run.failures",
        logging.ERROR,
        __file__,
        0,
        "run failed: %s",
        (error,),
        (type(cause), cause, cause.__traceback__),
    )
    handler.handle(record)


def collect_stale_stores(
    work_dir: Path, stems: list[str], held: dict[str, WorkDirLock], used: set[Path], mode: str
) -> None:
    """After a successful run, remove the stems' stores it did not use (``mode`` ``stale``) or all (``all``).

    A stem whose work_dir lock another run holds is left alone (that run may read its stores).
    """
    if mode == "keep":
        return
    for stem in stems:
        lock = held.get(stem)
        if lock is None or not try_exclusive(lock):
            logger.info("%s: another run uses %s: its stores are not collected now", stem, work_dir / stem)
            continue
        removed = resume.collect_stores(work_dir, stem, used, mode)
        if removed:
            logger.info(
                "%s: removed %d %sstore(s) from %s (cryosiam_dask.work_dir_cleanup: %s)",
                stem,
                len([p for p in removed if p.suffix == ".zarr"]),
                "stale " * (mode == "stale"),
                work_dir / stem,
                mode,
            )


def instance_predict(
    config: InstanceConfig,
    *,
    filename: str | None = None,
    client: Any = None,
    processes: bool = True,
    on_done: Callable[[TomogramResult], None] | None = None,
) -> list[TomogramResult]:
    """CryoSiam's ``instance_predict`` for every tomogram of ``config`` (or only ``filename``).

    Tomograms stream through their chains (``cryosiam_dask.tomograms_in_flight`` at once); a tomogram
    that fails costs that tomogram only.

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
    on_done : callable, optional
        Called with each tomogram's :class:`TomogramResult` as soon as its outputs are written (from the
        driver's thread), e.g. to show it in a viewer.

    Returns
    -------
    list of TomogramResult
        One per tomogram, in input order: instance count, output paths, report (timings, chunks computed).

    Raises
    ------
    TomogramsFailed
        After the run, when one or more tomograms failed (the others are written): ``.failed`` and
        ``.results``; the CLI exits with code 3.
    CryoSiamDaskError
        Refused before any work (config, input files, checkpoint, cluster start; code 2), or a run-wide
        failure (the scheduler lost, every worker paused for lack of memory).
    """
    from cryosiam_dask.run.cluster import resolve_device

    files, patch_size = validate(config, filename=filename)
    s = config.cryosiam_dask
    device = resolve_device(s.device)
    pairs = [(f, config.stem(f)) for f in files]
    locks, held = _lock_stems(config, pairs)
    handler = _add_log_file(config)
    try:
        logger.info(
            "instance_predict: %d tomogram(s), device %s, tiling %s, chunks %s, halo %d",
            len(files), device, s.tiling, tuple(s.chunk_size), s.halo,
        )
        settings = RunSettings.from_config(config, device=device, patch_size=patch_size)
        with resume.record_stores() as used:
            summary = _run(settings, pairs, client, processes, handler, held, on_done)
        stems = [stem for _, stem in pairs]
        collect_stale_stores(settings.inputs.work_dir, stems, held, used, settings.inputs.work_dir_cleanup)
        logger.info("instance_predict: %s", summary.line())
        if summary.failed:
            raise TomogramsFailed(summary.failed, summary.done, summary.line())
        return summary.done
    except (ClusterError, TaskError, TomogramsFailed) as e:
        _log_traceback(handler, e)
        raise
    finally:
        if handler is not None:
            logging.getLogger("cryosiam_dask").removeHandler(handler)
            handler.close()
        for work_lock in held.values():
            work_lock.release()
        for lock in locks:
            release_lock(lock)


def _lock_stems(config: InstanceConfig, pairs: list[tuple[Path, str]]) -> tuple[list[Path], dict]:
    """The output locks of every stem, then their work_dir locks (all or none)."""
    locks: list[Path] = []
    held: dict[str, WorkDirLock] = {}
    try:
        for _, stem in pairs:
            locks.append(acquire_lock(config.prediction_folder, stem))
        for _, stem in pairs:  # after the output locks: a second run of the same stems stops before waiting
            held[stem] = hold_work_dir(config.work_dir, stem)
    except BaseException:
        for work_lock in held.values():
            work_lock.release()
        for lock in locks:
            release_lock(lock)
        raise
    return locks, held


def _cleanup_now(settings: RunSettings, held: dict[str, WorkDirLock]) -> Any:
    """``work_dir_cleanup: all``: a callback removing a tomogram's stores once its outputs are written."""
    if settings.inputs.work_dir_cleanup != "all":
        return None

    from cryosiam_dask.io.convert import is_conversion

    def remove(result: TomogramResult) -> None:
        collect_stale_stores(settings.inputs.work_dir, [result.stem], held, set(), "all")
        conversion = settings.inputs.work_dir / f"{result.stem}.zarr"
        if is_conversion(conversion):  # never a .zarr input that happens to lie in work_dir
            import shutil

            shutil.rmtree(conversion, ignore_errors=True)

    return remove


def _each_done(*callbacks: Callable[[TomogramResult], None] | None) -> Any:
    """One ``on_done`` calling each given callback in turn (None when there is none)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None

    def call(result: TomogramResult) -> None:
        for c in given:
            c(result)

    return call


def cluster_plan(c: ClusterSettings) -> Any:
    """The :class:`~cryosiam_dask.run.cluster.ClusterPlan` of a run's cluster settings (started by the run, or
    by the napari run widget, which shows its dashboard first)."""
    from cryosiam_dask.run.cluster import plan_cluster

    return plan_cluster(
        device=c.device,
        scheduler_address=c.scheduler_address,
        scheduler_file=c.scheduler_file,
        n_workers=c.n_workers,
        threads_per_worker=c.threads_per_worker,
        memory_limit=c.memory_limit,
        gpu_devices=c.gpu_devices,
        dashboard_address=c.dashboard_address,
    )


def _run(
    settings: RunSettings,
    pairs: list[tuple[Path, str]],
    client: Any,
    processes: bool,
    handler: logging.Handler | None,
    held: dict[str, WorkDirLock],
    on_done: Callable[[TomogramResult], None] | None = None,
) -> RunSummary:
    """The dataset on ``client``, or on the cluster of the settings (started and closed here)."""
    from cryosiam_dask.run.cluster import start_client

    if client is not None:
        return _stream(settings, pairs, client, held, on_done)
    plan = cluster_plan(settings.cluster)
    log_file = getattr(handler, "baseFilename", None)
    worker_log = (
        Path(log_file).with_name(Path(log_file).name.replace("instance_predict", "workers"))
        if log_file
        else None
    )
    with start_client(plan, processes=processes, worker_log=worker_log) as started:
        return _stream(settings, pairs, started, held, on_done)


def _stream(settings: RunSettings, pairs: list[tuple[Path, str]], client: Any,
            held: dict[str, WorkDirLock],
            on_done: Callable[[TomogramResult], None] | None = None) -> RunSummary:
    """:func:`run_dataset` on `client`, with the memory watchdog and the work dir's peak."""
    from dataclasses import replace

    from cryosiam_dask.run.cluster import resources_of
    from cryosiam_dask.run.monitor import DiskPeak, PausedWatchdog
    from cryosiam_dask.run.progress import Abort

    s = settings.cluster
    workers = client.scheduler_info(n_workers=-1)["workers"]
    resources = resources_of(workers)
    if resources.host is not None and settings.instances.device != "cpu":
        # the instance stage runs on the CPU workers: their threads, not the GPUs' one each
        settings = replace(settings, instances=replace(settings.instances, device="cpu"))
    in_flight = s.tomograms_in_flight or max(2, len(workers) + 1)
    logger.info("%d tomogram(s) in flight; network tasks on %s, the rest on %s", min(in_flight, len(pairs)),
                resources.network or "any worker", resources.host or "any worker")
    abort = Abort()
    watchdog = PausedWatchdog(lambda: client.scheduler_info(n_workers=-1)["workers"], s.paused_timeout,
                              abort.stop)
    with DiskPeak(settings.inputs.work_dir) as disk, watchdog:
        summary = run_dataset(settings, pairs, in_flight=in_flight, resources=resources, abort=abort,
                              on_done=_each_done(_cleanup_now(settings, held), on_done))
    summary.work_dir_peak_bytes = disk.peak
    return summary
