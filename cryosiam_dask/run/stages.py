"""The four stages of ``instance_predict``, run for all tomograms of a config together.

1. :mod:`~cryosiam_dask.run.inputs`: MRC/REC -> chunked zarr, lamella masks;
2. :mod:`~cryosiam_dask.run.maps`: the network per chunk -> ``<work_dir>/<stem>/maps-<key>.zarr``;
3. :mod:`~cryosiam_dask.run.segment`: watershed per chunk window, global ids -> ``instances-<key>.zarr``;
   with ``postprocessing: True``, :mod:`~cryosiam_dask.run.multicut` -> ``multicut-<key>.zarr``;
4. :mod:`~cryosiam_dask.run.write`: every output file.

Each stage materialises to zarr in ``work_dir``, so no stage is computed twice, memory stays bounded and a
killed run resumes from per-chunk markers (:mod:`cryosiam_dask.run.resume`). The tasks of all tomograms of a
stage are computed together, so workers stay busy across files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryosiam_dask.run.failures import stage_error
from cryosiam_dask.run.inputs import open_inputs
from cryosiam_dask.run.maps import maps_fingerprint, predict_all
from cryosiam_dask.run.multicut import multicut_all
from cryosiam_dask.run.segment import segment_all
from cryosiam_dask.run.settings import RunSettings
from cryosiam_dask.run.write import write_outputs

logger = logging.getLogger(__name__)

__all__ = ["TomogramResult", "run_stages"]


@dataclass
class TomogramResult:
    """What ``instance_predict`` did for one tomogram."""

    stem: str
    shape: tuple[int, int, int]
    n_instances: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def _timed(name: str, timings: dict[str, float], n: int, work_dir: Path, fn: Any) -> Any:
    t0 = time.perf_counter()
    try:
        result = fn()
    except BaseException as e:  # one place maps every failure (worker, task, disk, key) to one line
        error = stage_error(e, name, work_dir)
        if error is e:
            raise
        raise error from e
    timings[name] = time.perf_counter() - t0
    logger.info("stage %-9s %8.2f s (%d tomogram%s)", name, timings[name], n, "s" * (n != 1))
    return result


def run_stages(settings: RunSettings, files: list[tuple[Path, str]]) -> list[TomogramResult]:
    """Run the four stages for ``files`` (``(path, stem)`` pairs) on the current dask scheduler."""
    timings: dict[str, float] = {}
    work_dir, n = settings.inputs.work_dir, len(files)
    items = _timed("inputs", timings, n, work_dir, lambda: open_inputs(files, settings.inputs))
    maps = _timed(
        "maps",
        timings,
        n,
        work_dir,
        lambda: predict_all(items, settings.network, settings.inputs, settings.outputs.prediction_folder),
    )
    stems = [i.stem for i in items]
    instances = _timed(
        "instances", timings, n, work_dir, lambda: segment_all(stems, maps, settings.instances, work_dir)
    )
    if settings.instances.postprocessing and settings.instances.boundary_bias != 1:
        instances = _timed(
            "multicut", timings, n, work_dir,
            lambda: multicut_all(stems, maps, instances, settings.instances, work_dir),
        )

    def write() -> list[tuple[int, dict[str, Path]]]:
        return [
            write_outputs(i, m, s, settings.outputs, maps_fingerprint(i, settings.network, settings.inputs))
            for i, m, s in zip(items, maps, instances, strict=True)
        ]

    written = _timed("outputs", timings, n, work_dir, write)
    results = []
    for item, m, s, (count, paths) in zip(items, maps, instances, written, strict=True):
        report = {
            "value_range": item.value_range,
            **m.report,
            **s.report,
            "stage_seconds_all_tomograms": timings,
        }
        r = TomogramResult(stem=item.stem, shape=item.shape, n_instances=count, outputs=paths, report=report)
        if count == 0:
            logger.warning("%s: 0 instances found (outputs written with 0 instances)", r.stem)
        logger.info("%s: %d instances -> %s", r.stem, count, ", ".join(p.name for p in paths.values()))
        results.append(r)
    return results
