"""The four stages of ``instance_predict``, run for all tomograms of a config together.

Stages (each materialised to zarr in ``work_dir`` so no stage is computed twice and memory stays bounded):

1. inputs: MRC/REC -> chunked zarr (reused when up to date), lamella mask (resized lazily as CryoSiam does);
2. maps: the network per chunk (``exact`` or ``fast`` tiling) -> ``<work_dir>/<stem>/maps.zarr``;
3. instances: seeded watershed per chunk with a halo, global ids -> ``<work_dir>/<stem>/instances.zarr``;
4. outputs: CryoSiam's h5 + csv, raw maps, OME-Zarr, MRC, STAR (``cryosiam_dask.output_formats``).

The tasks of all tomograms of a stage are computed together, so workers stay busy across files.

Reliability (:mod:`cryosiam_dask._resume`): the maps and instance stores are named by a hash of what they
depend on (source size+mtime, checkpoint size+mtime, mask files, normalisation, tiling, chunking, batch size,
amp; post-processing keys and halo), and every chunk task writes whole zarr chunks and then a done marker, so
a killed run started again recomputes only unfinished chunks (and a lost worker's tasks rewrite the same
bytes); outputs are rewritten atomically. Each output stem is locked (``.<stem>.cryosiam_dask.lock``) against
a concurrent run. Tomograms with NaN/inf voxels are refused (count and file named), not repaired.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask import _resume
from cryosiam_dask._progress import PROGRESS
from cryosiam_dask.config import InstanceConfig
from cryosiam_dask.errors import CryoSiamDaskError, InputFileError, OutputError

logger = logging.getLogger(__name__)

MAP_NAMES = ("foreground", "distance", "boundary")

NOT_SUPPORTED_MULTICUT = (
    "parameters.network.postprocessing: True (CryoSiam's multicut through elf/nifty, conda-only) is not "
    "supported; set 'postprocessing: False' for the seeded watershed (the docs' config_instance.yaml does)"
)


@dataclass
class TomogramResult:
    """What ``instance_predict`` did for one tomogram."""

    stem: str
    shape: tuple[int, int, int]
    n_instances: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    path: Path
    stem: str
    tomogram: Any = None  # io.Tomogram
    mask: da.Array | None = None
    maps: tuple[da.Array, da.Array, da.Array] | None = None
    labels: da.Array | None = None
    result: TomogramResult | None = None
    raw_reused: bool = False
    maps_key: str = ""
    instance_markers: Any = None


def _fingerprint(config: InstanceConfig, job: _Job) -> dict[str, Any]:
    """What the raw maps depend on: checkpoint file, normalisation, tiling (and its chunking), mask file."""
    ckpt = config.checkpoint_path
    st = ckpt.stat()
    d = config.parameters.data
    s = config.cryosiam_dask
    fp: dict[str, Any] = {
        "checkpoint": [str(ckpt), st.st_size, st.st_mtime_ns],
        "data": [d.min, d.max, d.mean, d.std],
        "tiling": s.tiling,
        "source": [str(job.path), job.path.stat().st_size, job.path.stat().st_mtime_ns],
        "mask_folder": str(config.mask_folder) if config.mask_folder else None,
    }
    if s.tiling == "fast":
        fp["chunk_size"] = list(s.chunk_size)
        fp["fast"] = [s.fast_window, s.fast_margin]
    return fp


def _key(fp: dict[str, Any]) -> str:
    return _resume.fingerprint_key(fp)


def _maps_key(config: InstanceConfig, job: _Job) -> str:
    """Name of the maps store: the raw-maps fingerprint + chunking, mask file, batch size, amp."""
    s = config.cryosiam_dask
    return _resume.fingerprint_key(
        _fingerprint(config, job),
        list(s.chunk_size),
        _mask_stamp(config, job),
        config.hyper_parameters.batch_size,
        s.amp,
        job.raw_reused,
    )


def _mask_stamp(config: InstanceConfig, job: _Job) -> list[Any] | None:
    if config.mask_folder is None:
        return None
    return [_resume.file_stamp(p) for p in sorted(config.mask_folder.glob(f"{job.stem}*")) if p.is_file()]


def _instances_key(config: InstanceConfig, job: _Job) -> str:
    """Name of the instance store: the maps it reads + every post-processing setting and the halo."""
    n = config.parameters.network
    semantic = None
    if config.semantic_predictions is not None:
        path = config.semantic_predictions / f"{job.stem}_preds.h5"
        semantic = [_resume.file_stamp(path) if path.exists() else None, config.semantic_foreground_labels]
    return _resume.fingerprint_key(
        job.maps_key,
        [n.threshold_foreground, n.min_center_distance, n.max_center_distance, n.distance_type],
        config.cryosiam_dask.halo,
        semantic,
    )


def _compute(*objs: Any) -> tuple[Any, ...]:
    """``dask.compute`` with a progress bar on stderr when ``progress`` is on (the CLI turns it on).

    On a distributed client the bar is ``distributed.progress`` over the futures; otherwise dask's local
    ``ProgressBar``.
    """
    if not PROGRESS["on"]:
        return dask.compute(*objs)
    try:
        from distributed import get_client, progress

        client = get_client()
    except (ImportError, ValueError):
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return dask.compute(*objs)
    futures = client.compute(list(objs))
    progress(futures)
    print(file=sys.stderr)
    return tuple(client.gather(futures))


def _warn_range(job: _Job, lo: float, hi: float, data_min: float, data_max: float) -> None:
    span = data_max - data_min
    if span > 0 and (lo < data_min - 2 * span or hi > data_max + 2 * span):
        logger.warning(
            "%s: values span [%.4g, %.4g] but parameters.data min/max are [%g, %g]: CryoSiam clips to that "
            "range and then finds nothing; feed the denoised, [0, 1]-scaled tomogram (denoise_predict) "
            "or set parameters.data.min/max to the tomogram's range",
            job.path.name,
            lo,
            hi,
            data_min,
            data_max,
        )


def _open_inputs(config: InstanceConfig, jobs: list[_Job]) -> None:
    """Open (convert) every tomogram and mask; refuse NaN/inf voxels, warn on constant or mis-scaled input."""
    from cryosiam_dask.io import open_tomogram
    from cryosiam_dask.masks import read_mask

    s = config.cryosiam_dask
    d = config.parameters.data
    for job in jobs:
        job.tomogram = open_tomogram(
            job.path,
            work_dir=config.work_dir,
            chunk_size=tuple(s.chunk_size),
            file_extension=config.file_extension,
        )
        shape = tuple(int(n) for n in job.tomogram.data.shape)
        job.mask = read_mask(config.mask_folder, job.stem, shape, chunks=tuple(s.chunk_size))
        job.result = TomogramResult(stem=job.stem, shape=shape)
    checks = []
    for job in jobs:
        x = job.tomogram.data
        if np.issubdtype(x.dtype, np.floating):
            ok = da.isfinite(x)
            checks.append(((~ok).sum(), da.where(ok, x, np.inf).min(), da.where(ok, x, -np.inf).max()))
        else:
            checks.append((0, x.min(), x.max()))
    for job, (bad, lo, hi) in zip(jobs, dask.compute(*checks), strict=True):
        if int(bad):
            raise InputFileError(
                f"{job.path}: {int(bad)} NaN/inf voxel(s) of {int(np.prod(job.result.shape))}; replace them "
                "(e.g. numpy.nan_to_num with the tomogram's mean) and run again"
            )
        job.result.report["value_range"] = (float(lo), float(hi))
        if float(lo) == float(hi):
            logger.warning(
                "%s: constant tomogram (every voxel %g): no instances can be found", job.path.name, float(lo)
            )
        _warn_range(job, float(lo), float(hi), d.min, d.max)


def _predict_maps(config: InstanceConfig, jobs: list[_Job], device: str) -> None:
    """Network maps of every tomogram into ``<work_dir>/<stem>/maps-<key>.zarr``, per chunk, resumable."""
    from cryosiam_dask.inference import predict_maps, skipped_fraction
    from cryosiam_dask.outputs import read_raw_predictions

    s = config.cryosiam_dask
    d = config.parameters.data
    writes = []
    for job in jobs:
        fp = _fingerprint(config, job)
        raw = config.prediction_folder / f"{job.stem}_preds.h5"
        shape = job.result.shape
        job.maps_key = _maps_key(config, job)
        store = config.work_dir / job.stem / f"maps-{job.maps_key}.zarr"
        markers = _resume.ChunkMarkers(store.with_name(store.name + ".done") / "maps", "maps")
        blocks = list(np.ndindex(*job.tomogram.data.numblocks))
        todo = [i for i in blocks if not markers.done(i)]
        if todo and raw.exists():  # a complete maps store of this run's settings wins over the raw h5
            reused = read_raw_predictions(raw, fp, shape=shape, chunks=tuple(s.chunk_size))
            if reused is not None:
                logger.info("%s: reusing raw maps %s (network skipped, as CryoSiam does)", job.stem, raw.name)
                job.maps, job.raw_reused = reused, True
                job.maps_key = _maps_key(config, job)
                continue
        if job.mask is not None:
            frac = skipped_fraction(job.mask, job.tomogram.data.chunks)
            job.result.report["chunks_skipped_outside_mask"] = frac
            logger.info(
                "%s: %.0f%% of chunks lie outside the lamella and skip the network", job.stem, 100 * frac
            )
            if frac == 1.0:
                logger.warning("%s: the lamella mask is all zero: no instances will be found", job.stem)
        chunks = tuple(int(c[0]) for c in job.tomogram.data.chunks)
        targets = [
            _resume.open_chunked(store, name, shape=shape, chunks=chunks, dtype=np.float32, markers=markers)
            for name in MAP_NAMES
        ]
        job.maps = tuple(da.from_zarr(t, chunks=job.tomogram.data.chunks) for t in targets)
        todo = [i for i in blocks if not markers.done(i)]  # open_chunked clears the markers of a new store
        job.result.report["maps_chunks_computed"] = len(todo)
        n_all = len(blocks)
        if len(todo) < n_all:
            logger.info(
                "%s: maps: %d of %d chunks done in an earlier run", job.stem, n_all - len(todo), n_all
            )
        if not todo:
            continue
        maps = predict_maps(
            job.tomogram.data,
            config.checkpoint_path,
            tiling=s.tiling,
            data=(d.min, d.max, d.mean, d.std),
            batch_size=config.hyper_parameters.batch_size,
            mask=job.mask,
            device=device,
            amp=s.amp,
            margin=s.fast_margin,
            window=s.fast_window,
        )
        writes += _chunk_writes(maps, targets, markers, todo)
    if writes:
        _compute(*writes)


def _chunk_writes(arrays: Any, targets: list[Any], markers: Any, todo: list[tuple[int, ...]]) -> list[Any]:
    """One delayed task per chunk in ``todo``: write that chunk of every array, then the marker."""
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in arrays[0].chunks]
    write = dask.delayed(_resume.write_chunk, pure=False)
    tasks = []
    for index in todo:
        region = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, index, strict=True))
        tasks.append(write([a.blocks[index] for a in arrays], targets, region, markers, index))
    return tasks


def _semantic_override(config: InstanceConfig, job: _Job) -> None:
    """fg = ``isin(semantic labels, semantic_foreground_labels)`` if semantic_predictions is set."""
    if config.semantic_predictions is None:
        return
    import h5py

    path = config.semantic_predictions / f"{job.stem}_preds.h5"
    if not path.exists():
        raise InputFileError(f"semantic prediction {path} does not exist")
    with h5py.File(path, "r") as f:
        labels = f["labels"][...]
    if labels.shape != job.result.shape:
        raise InputFileError(
            f"semantic prediction {path.name} is {labels.shape} but tomogram is {job.result.shape}"
        )
    fg = np.isin(labels, config.semantic_foreground_labels).astype(np.float32)
    fg_da = da.from_array(fg, chunks=job.maps[0].chunks)
    job.maps = (fg_da, job.maps[1], job.maps[2])


def _segment_one(config: InstanceConfig, job: _Job) -> Any:
    """Instances of one tomogram; window keys go to a zarr store in work_dir (bounded memory, resumable)."""
    from cryosiam_dask.merge import segment_instances

    n = config.parameters.network
    _semantic_override(config, job)
    fg, dist, _ = job.maps
    chunks = tuple(int(c[0]) for c in fg.chunks)
    store = config.work_dir / job.stem / f"instances-{_instances_key(config, job)}.zarr"
    done = store.with_name(store.name + ".done")
    job.instance_markers = _resume.ChunkMarkers(done / "instances", "instances")
    windows = _resume.ChunkMarkers(done / "windows", "windows")
    keys = _resume.open_chunked(
        store, "keys", shape=fg.shape, chunks=chunks, dtype=np.uint64, markers=windows
    )
    n_done = windows.count()
    labels, report = segment_instances(
        fg,
        dist,
        threshold_min=n.min_center_distance,
        threshold_max=n.max_center_distance,
        assignment_threshold=n.threshold_foreground,
        distance_type=n.distance_type,
        halo=config.cryosiam_dask.halo,
        keys_store=keys,
        records=windows,
    )
    job.result.report["windows_computed"] = report.n_chunks - n_done
    target = _resume.open_chunked(
        store, "instances", shape=fg.shape, chunks=chunks, dtype=np.uint32, markers=job.instance_markers
    )
    return labels, report, target


def _segment(config: InstanceConfig, jobs: list[_Job]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # One thread per tomogram submits its windows, so the windows of all tomograms share the cluster.
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        done = list(pool.map(lambda job: _segment_one(config, job), jobs))
    writes = []
    for job, (labels, report, target) in zip(jobs, done, strict=True):
        markers = job.instance_markers
        todo = [i for i in np.ndindex(*labels.numblocks) if not markers.done(i)]
        job.result.report["label_chunks_computed"] = len(todo)
        n_all = int(np.prod(labels.numblocks))
        if len(todo) < n_all:
            logger.info(
                "%s: labels: %d of %d chunks done in an earlier run", job.stem, n_all - len(todo), n_all
            )
        writes += _chunk_writes([labels], [target], markers, todo)
        job.labels = da.from_zarr(target, chunks=labels.chunks)
        job.result.report.update(_report_dict(report))
        job.result.n_instances = int(job.result.report.get("n_instances", 0))
    if writes:
        _compute(*writes)


def _report_dict(report: Any) -> dict[str, Any]:
    if isinstance(report, dict):
        return dict(report)
    if hasattr(report, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(report)
    return {"report": repr(report)}


def _write_outputs(config: InstanceConfig, jobs: list[_Job]) -> None:
    """Every output of every tomogram, each written atomically (a killed run leaves none that looks complete).

    On a resumed run they are all rewritten: they are cheap next to the network and the instances.
    """
    from cryosiam_dask import outputs as out

    formats = set(config.cryosiam_dask.output_formats)
    folder = config.prediction_folder
    written = 0

    def put(res: TomogramResult, key: str, writer: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        nonlocal written
        try:
            res.outputs[key] = writer(path, *args, **kwargs)
        except CryoSiamDaskError:
            raise
        except OSError as e:
            raise _output_error(e, path) from e
        written += 1
        _resume.maybe_die("outputs", written)

    for job in jobs:
        res = job.result
        table = out.region_table(job.labels)
        res.n_instances = int(len(table["label"]))
        if "cryosiam" in formats:
            put(
                res,
                "instances_h5",
                out.write_instances_h5,
                folder / f"{job.stem}_instance_preds.h5",
                job.labels,
            )
            put(res, "regions_csv", out.write_regions_csv, folder / f"{job.stem}_instance_regions.csv", table)
        if (config.save_raw_predictions or "raw" in formats) and not job.raw_reused:
            fg, dist, bnd = job.maps
            put(
                res,
                "raw_h5",
                out.write_raw_predictions_h5,
                folder / f"{job.stem}_preds.h5",
                fg,
                dist,
                bnd,
                attrs=_fingerprint(config, job),
            )
        vs = job.tomogram.voxel_size
        if "ome-zarr" in formats:
            maps = dict(zip(("foreground", "distances", "boundaries"), job.maps, strict=True))
            put(
                res,
                "ome_zarr",
                out.write_ome_zarr,
                folder / f"{job.stem}.ome.zarr",
                job.tomogram.data,
                job.labels,
                voxel_size=vs,
                maps=maps,
            )
        if "mrc" in formats:
            put(
                res,
                "mrc",
                out.write_mrc_labels,
                folder / f"{job.stem}_instances.mrc",
                job.labels,
                voxel_size=vs,
                max_label=res.n_instances,
            )
        if "star" in formats:
            put(
                res,
                "star",
                out.write_star,
                folder / f"{job.stem}_instances.star",
                table,
                voxel_size=vs[2],
                tomogram_name=job.path.name,
            )


def _output_error(e: OSError, where: Path) -> OutputError:
    """One line for an OSError while writing a stage's store: the writers' classification (disk full, not
    permitted), with the hint that a rerun resumes; any other error with its own text."""
    from cryosiam_dask._output_common import _as_output_error

    known = _as_output_error(e, where)
    if known is not None:
        return OutputError(f"{known}; free space or fix permissions and run again (it resumes)")
    text = e.strerror or str(e) or type(e).__name__
    return OutputError(f"writing {where} failed ({type(e).__name__}: {text})")


def run_stages(config: InstanceConfig, files: list[Path], *, device: str) -> list[TomogramResult]:
    """Run the four stages for ``files`` on the current dask scheduler (a client must be active if wanted)."""
    jobs = [_Job(path=f, stem=config.stem(f)) for f in files]
    timings: dict[str, float] = {}
    for name, stage in (
        ("inputs", lambda: _open_inputs(config, jobs)),
        ("maps", lambda: _predict_maps(config, jobs, device)),
        ("instances", lambda: _segment(config, jobs)),
        ("outputs", lambda: _write_outputs(config, jobs)),
    ):
        t0 = time.perf_counter()
        try:
            stage()
        except CryoSiamDaskError:
            raise
        except OSError as e:  # disk full / read-only work_dir inside a stage's zarr writes
            where = Path(e.filename) if getattr(e, "filename", None) else config.work_dir
            raise _output_error(e, where) from e
        timings[name] = time.perf_counter() - t0
        logger.info(
            "stage %-9s %8.2f s (%d tomogram%s)", name, timings[name], len(jobs), "s" * (len(jobs) != 1)
        )
    results = [job.result for job in jobs]
    for r in results:
        r.report["stage_seconds_all_tomograms"] = timings
        if r.n_instances == 0:
            logger.warning("%s: 0 instances found (outputs written with 0 instances)", r.stem)
        logger.info(
            "%s: %d instances -> %s", r.stem, r.n_instances, ", ".join(p.name for p in r.outputs.values())
        )
    return results
