"""Post-processing stage: the in-memory reference vs the chunked instance step on 1 and 2 workers.

Synthetic maps like the network's targets (random balls: fg = blurred ball indicator, distance = signed EDT
clipped to [-5, 5]), one run each: (a) ``instances.instance_segmentation`` on the whole volume in this
process; on a process LocalCluster of 1 and 2 workers (one thread each), a warm-up on a small volume before:
(b) ``merge.segment_instances`` (the in-memory API) on input persisted first (``--api memory``), and (c) the
pipeline's instance stage ``run.segment.segment_one`` on maps in a zarr store, as the pipeline reads them,
keys, records and labels written to a fresh work dir (``--api store``). Prints voxels/s, peak RSS (this
process plus its workers, sampled), the ratios against (a), the 2-worker speed-up over 1 worker, the CPU
seconds the workers and this process (client + scheduler) used, and whether the chunked ids equal the
reference; writes JSON. On a machine shared with other jobs the CPU seconds tell whether the workers got
their cores: ``busy = worker CPU / (workers x wall)`` well below 1 means they did not.

    python -m benchmarks.bench_instances --shape 96 192 192 --chunks 48 --halo 24
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import PeakRSS, table, write_results

PARAMS = dict(min_center_distance=1, max_center_distance=4, threshold_foreground=0.65, distance_type=1)


def setup(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random balls kept apart (radius 3-7, up to one per 8000 voxels): fg and distance maps, float32."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    inside = np.zeros(shape, bool)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(max(1, int(np.prod(shape) / 8000))):
        c, r = rng.uniform(0, shape), rng.uniform(3, 7)
        if any(np.linalg.norm(c - c2) < r + r2 + 2 for c2, r2 in placed):
            continue  # apart: touching clusters would grow beyond the halo
        placed.append((c, r))
        lo = np.maximum(0, np.floor(c - r)).astype(int)
        hi = np.minimum(shape, np.ceil(c + r) + 1).astype(int)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        z, y, x = np.ogrid[sl]
        inside[sl] |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
    dist = np.clip(ndi.distance_transform_edt(inside) - ndi.distance_transform_edt(~inside), -5, 5)
    fg = ndi.gaussian_filter(inside.astype(np.float32), 1.0)
    return fg, dist.astype(np.float32)


def time_reference(fg: np.ndarray, dist: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    from cryosiam_dask.instances.reference import instance_segmentation

    instance_segmentation(fg[:16, :16, :16], dist[:16, :16, :16], **PARAMS)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        labels = instance_segmentation(fg, dist, **PARAMS)
        wall = time.perf_counter() - t0
    return {"run": "in-memory reference", "wall_s": wall, "peak_rss_GiB": mem.peak / 2**30}, labels


def _cpu_seconds() -> float:
    return time.process_time()


def time_chunked(
    fg: np.ndarray, dist: np.ndarray, chunks: tuple[int, ...], halo: int, workers: int
) -> tuple[dict[str, Any], np.ndarray]:
    """``segment_instances`` (in memory) on persisted input: wall, peak RSS, CPU s of workers and client."""
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    from cryosiam_dask.instances.memory_store import segment_instances
    from cryosiam_dask.instances.params import PostParams

    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl,
        Client(cl) as client,
    ):
        small = [da.from_array(a[:24, :24, :24], chunks=12) for a in (fg, dist)]
        warm = PostParams(halo=halo, **PARAMS)
        segment_instances(*small, warm)[0].compute()  # warm-up (imports in the workers)
        f, d = (client.persist(da.from_array(a, chunks=chunks)) for a in (fg, dist))
        wait([f, d])
        cpu0, me0 = client.run(_cpu_seconds), time.process_time()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            lazy, report = segment_instances(f, d, PostParams(halo=halo, **PARAMS))
            labels = lazy.compute()
            wall = time.perf_counter() - t0
        cpu1, me1 = client.run(_cpu_seconds), time.process_time()
    row = {
        "run": f"chunked, {workers} worker(s)",
        "wall_s": wall,
        "peak_rss_GiB": mem.peak / 2**30,
        "worker_cpu_s": sum(cpu1[k] - cpu0[k] for k in cpu0),
        "client_cpu_s": me1 - me0,
        "n_chunks": report.n_chunks,
        "n_skipped": report.n_skipped,
        "oversized": report.oversized,
    }
    return row, labels


def time_stage(
    fg: np.ndarray, dist: np.ndarray, chunks: tuple[int, ...], halo: int, workers: int, work: Path
) -> tuple[dict[str, Any], np.ndarray]:
    """The pipeline's instance stage (``run.segment.segment_one``) on zarr maps, into a fresh work dir."""
    import shutil

    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    from cryosiam_dask.instances.params import PostParams
    from cryosiam_dask.run.maps import Maps
    from cryosiam_dask.run.segment import segment_one
    from cryosiam_dask.run.settings import InstanceSettings

    def maps_of(f: np.ndarray, d: np.ndarray, path: Path, c: tuple[int, ...]) -> Maps:
        group = zarr.open_group(str(path), mode="w")
        arrays = []
        for name, a in (("foreground", f), ("distances", d), ("boundaries", np.zeros_like(f))):
            z = group.create_array(name, shape=a.shape, chunks=c, dtype=np.float32)
            z[...] = a
            arrays.append(da.from_zarr(z, chunks=c))
        return Maps(*arrays, key=path.stem, raw_reused=False, report={})

    settings = InstanceSettings(post=PostParams(halo=halo, **PARAMS))
    shutil.rmtree(work, ignore_errors=True)
    small = maps_of(fg[:24, :24, :24], dist[:24, :24, :24], work / "small_maps.zarr", (12, 12, 12))
    maps = maps_of(fg, dist, work / "maps.zarr", chunks)
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl,
        Client(cl) as client,
    ):
        segment_one("small", small, settings, work / "warm")  # warm-up (imports in the workers)
        cpu0, me0 = client.run(_cpu_seconds), time.process_time()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = segment_one("bench", maps, settings, work / f"run{workers}")
            wall = time.perf_counter() - t0
        cpu1, me1 = client.run(_cpu_seconds), time.process_time()
        labels = out.labels.compute()
    row = {
        "run": f"store stage, {workers} worker(s)",
        "wall_s": wall,
        "peak_rss_GiB": mem.peak / 2**30,
        "worker_cpu_s": sum(cpu1[k] - cpu0[k] for k in cpu0),
        "client_cpu_s": me1 - me0,
        "n_chunks": out.report["n_chunks"],
        "n_skipped": out.report["n_skipped"],
        "oversized": out.report["oversized"],
    }
    return row, labels


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--chunks", type=int, nargs="+", default=[64], help="one edge or (z, y, x)")
    p.add_argument("--halo", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--api", choices=["memory", "store", "both"], default="both")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    shape = tuple(args.shape)
    chunks = tuple(args.chunks) * 3 if len(args.chunks) == 1 else tuple(args.chunks)
    fg, dist = setup(shape)
    config = {"shape": shape, "chunks": chunks, "halo": args.halo, "params": PARAMS, "threads_per_worker": 1}
    ref_row, ref = time_reference(fg, dist)
    ref_row["n_instances"] = int(ref.max())
    rows = [ref_row]
    apis = ["memory", "store"] if args.api == "both" else [args.api]
    for api in apis:
        for workers in args.workers:
            if api == "memory":
                row, labels = time_chunked(fg, dist, chunks, args.halo, workers)
            else:
                row, labels = time_stage(fg, dist, chunks, args.halo, workers, args.out / "stage_work")
            row["ids_equal_reference"] = bool(np.array_equal(labels, ref))
            row["n_instances"] = int(labels.max())
            row["busy"] = row["worker_cpu_s"] / (workers * row["wall_s"])
            rows.append(row)
    n = int(np.prod(shape))
    for r in rows:
        r["voxels_per_s"] = n / r["wall_s"]
        r["speed_ratio_vs_reference"] = ref_row["wall_s"] / r["wall_s"]
        r["rss_ratio_vs_reference"] = r["peak_rss_GiB"] / ref_row["peak_rss_GiB"]
    one_worker = {r["run"].split(",")[0]: r["wall_s"] for r in rows[1:] if r["run"].endswith(" 1 worker(s)")}
    for r in rows[1:]:  # speed-up over the 1-worker row of the same api
        if r["run"].split(",")[0] in one_worker:
            r["speedup_vs_1_worker"] = one_worker[r["run"].split(",")[0]] / r["wall_s"]
    print(
        table(
            rows,
            [
                "run",
                "wall_s",
                "voxels_per_s",
                "speed_ratio_vs_reference",
                "speedup_vs_1_worker",
                "worker_cpu_s",
                "client_cpu_s",
                "busy",
                "peak_rss_GiB",
                "rss_ratio_vs_reference",
                "n_instances",
                "ids_equal_reference",
                "oversized",
            ],
        )
    )
    path = write_results(args.out, f"bench_instances_{'x'.join(map(str, shape))}", config, rows)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
