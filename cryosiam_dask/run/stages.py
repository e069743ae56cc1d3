"""The chain of one tomogram, and a dataset streamed through it with a bounded number in flight.

A tomogram's chain: :mod:`~cryosiam_dask.run.inputs` (MRC/REC -> zarr, mask) -> :mod:`~cryosiam_dask.run.maps`
(the network per inference block) -> :mod:`~cryosiam_dask.run.segment` (watershed windows, global ids) ->
:mod:`~cryosiam_dask.run.multicut` (``postprocessing: True``) -> :mod:`~cryosiam_dask.run.write` (every
output). Each step starts as soon as the previous one is done; ``tomograms_in_flight`` chains run at once,
each on its own :class:`~cryosiam_dask.run.progress.Lane` (earlier tomograms first), so outputs appear
tomogram by tomogram and one tomogram's post-processing overlaps the next one's network.

A chain that fails (a task that raises after dask's retries, a worker lost on its tasks, an unreadable
file) costs that tomogram only: one line with its cause, the others go on. A run-wide failure (the scheduler
gone, every worker paused for lack of memory) stops every chain; tomograms not started are reported skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryosiam_dask.errors import ClusterError
from cryosiam_dask.run.failures import is_run_failure, stage_error
from cryosiam_dask.run.inputs import open_inputs
from cryosiam_dask.run.maps import maps_fingerprint, predict_one
from cryosiam_dask.run.multicut import multicut_one
from cryosiam_dask.run.progress import Abort, Lane, Resources
from cryosiam_dask.run.segment import segment_one
from cryosiam_dask.run.settings import RunSettings
from cryosiam_dask.run.write import write_outputs

logger = logging.getLogger(__name__)

__all__ = ["RunSummary", "TomogramFailure", "TomogramResult", "run_dataset", "run_tomogram"]


@dataclass
class TomogramResult:
    """What ``instance_predict`` did for one tomogram."""

    stem: str
    shape: tuple[int, int, int]
    n_instances: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TomogramFailure:
    """A tomogram whose chain failed: its input file, the stage and the one-line cause."""

    stem: str
    path: Path
    stage: str
    error: BaseException

    def line(self) -> str:
        """``<stem> (<file>), stage <stage>: <cause>`` on one line."""
        text = " ".join(str(self.error).splitlines()) or type(self.error).__name__
        where = "" if text.startswith("stage ") else f", stage {self.stage}"
        return f"{self.stem} ({self.path.name}){where}: {text}"


@dataclass
class RunSummary:
    """Every tomogram of a run: done, failed, or skipped (not started after a run-wide failure)."""

    done: list[TomogramResult] = field(default_factory=list)
    failed: list[TomogramFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    work_dir_peak_bytes: int = 0

    def line(self) -> str:
        """``<n> done, <n> failed, <n> skipped; work dir peak <size>``."""
        from dask.utils import format_bytes

        return (
            f"{len(self.done)} done, {len(self.failed)} failed, {len(self.skipped)} skipped; "
            f"work dir peak {format_bytes(self.work_dir_peak_bytes)}"
        )


class _Stage:
    """Names the running stage of a chain (for the failure line), times it and logs its end."""

    def __init__(self, stem: str) -> None:
        self.name, self.stem, self.timings = "inputs", stem, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` as stage `name` and record its seconds."""
        self.name = name
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        logger.info("stage %-9s %8.2f s (%s)", name, self.timings[name], self.stem)
        return out


def run_tomogram(settings: RunSettings, path: Path, stem: str, lane: Lane, stage: _Stage) -> TomogramResult:
    """One tomogram through every stage on `lane`; raises what the failing stage raised."""
    s, work_dir = settings, settings.inputs.work_dir
    [item] = stage.run("inputs", lambda: open_inputs([(path, stem)], s.inputs, lane))
    maps = stage.run(
        "maps", lambda: predict_one(item, s.network, s.inputs, s.outputs.prediction_folder, lane)
    )
    inst = stage.run("instances", lambda: segment_one(stem, maps, s.instances, work_dir, lane))
    if s.instances.post.multicut_on:
        inst = stage.run("multicut", lambda: multicut_one(stem, maps, inst, s.instances, work_dir, lane))
    fp = maps_fingerprint(item, s.network, s.inputs)
    count, paths = stage.run("outputs", lambda: write_outputs(item, maps, inst, s.outputs, fp))
    report = {"value_range": item.value_range, **maps.report, **inst.report, "stage_seconds": stage.timings}
    if count == 0:
        logger.warning("%s: 0 instances found (outputs written with 0 instances)", stem)
    logger.info("%s: %d instances -> %s", stem, count, ", ".join(p.name for p in paths.values()))
    logger.info("%s: stage seconds %s", stem, json.dumps(stage.timings))
    return TomogramResult(stem=stem, shape=item.shape, n_instances=count, outputs=paths, report=report)


def _chain(
    settings: RunSettings, path: Path, stem: str, lane: Lane
) -> TomogramResult | TomogramFailure | None:
    """:func:`run_tomogram` with its failure mapped to one line; None when the run was stopped before it."""
    if lane.abort.event.is_set():
        return None
    stage = _Stage(stem)
    try:
        return run_tomogram(settings, path, stem, lane, stage)
    except BaseException as e:
        if lane.abort.event.is_set() and lane.abort.error is not None:
            raise lane.abort.error from e
        error = stage_error(e, stage.name, settings.inputs.work_dir)
        if error is e and not isinstance(e, Exception):
            raise  # KeyboardInterrupt, SystemExit
        if is_run_failure(e):
            lane.abort.stop(error)
            raise error from e
        logger.debug("%s failed", stem, exc_info=e)
        return TomogramFailure(stem, path, stage.name, error)


def run_dataset(
    settings: RunSettings,
    files: list[tuple[Path, str]],
    *,
    in_flight: int,
    resources: Resources | None = None,
    abort: Abort | None = None,
    on_done: Callable[[TomogramResult], None] | None = None,
) -> RunSummary:
    """Stream `files` (``(path, stem)`` pairs) through their chains, `in_flight` at a time.

    Raises the run-wide error (:class:`~cryosiam_dask.errors.ClusterError`) when the run was stopped;
    a tomogram's own failure is in the summary instead.
    """
    abort = abort or Abort()
    summary, n = RunSummary(), len(files)
    lanes = [
        Lane(priority=-i, resources=resources or Resources(), abort=abort, progress=n == 1) for i in range(n)
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(in_flight, n)), thread_name_prefix="tomogram") as pool:
        futures = {
            pool.submit(_chain, settings, path, stem, lane): stem
            for (path, stem), lane in zip(files, lanes, strict=True)
        }
        for future in as_completed(futures):
            try:
                out = future.result()
            except ClusterError:
                continue  # the run-wide error, raised below once every chain has ended
            if out is None:
                summary.skipped.append(futures[future])
            elif isinstance(out, TomogramFailure):
                summary.failed.append(out)
                logger.error("%s (%d of %d)", out.line(), len(summary.done) + len(summary.failed), n)
            else:
                summary.done.append(out)
                logger.info(
                    "%s done: %d instances (%d of %d)",
                    out.stem,
                    out.n_instances,
                    len(summary.done) + len(summary.failed),
                    n,
                )
                if on_done is not None:
                    on_done(out)
    if abort.error is not None:
        raise abort.error
    order = {stem: i for i, (_, stem) in enumerate(files)}
    summary.done.sort(key=lambda r: order[r.stem])
    return summary
