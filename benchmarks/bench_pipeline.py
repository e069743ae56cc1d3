"""Whole pipeline: the original's in-memory pipeline vs cryosiam_dask (fast, exact; 1 and 2 workers);
scaling.

Every configuration runs in its own subprocess on the same synthetic tomogram, mask and checkpoint, so peak
RSS (this process + its dask workers, sampled) is not polluted by earlier runs. Results are printed as
tables and written as JSON beside the configuration that produced them.

    python -m benchmarks.bench_pipeline --shape 64 128 128 --arch tiny --chunks 64 128 128 --scales 1 2 4 8

The baseline ("original") is this package's faithful in-memory re-implementation of CryoSiam: whole tomogram
read into RAM, the 50 %-overlap tiling of ``inference.predict_whole`` in one process, the mask multiply, and
``instances.instance_segmentation`` on the whole volume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import PeakRSS, spawn_one, table, write_results


def make_case(folder: Path, shape: tuple[int, int, int], arch: str, seed: int = 0) -> Path:
    """Write tomogram, mask, checkpoint and config for ``shape`` (the demo's layout); return the config."""
    from cryosiam_dask.demo import write_demo_inputs

    return write_demo_inputs(
        folder,
        shape=shape,
        seed=seed,
        stem="TS_bench",
        arch=arch,
        patch_size=32 if arch == "tiny" else 64,
        save_raw_predictions=False,
    )


def run_original(config_path: Path) -> dict[str, Any]:
    """The original's pipeline in memory, one process."""
    import h5py
    import mrcfile
    import torch

    from cryosiam_dask.config import load_config
    from cryosiam_dask.instances.reference import instance_segmentation
    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model
    from cryosiam_dask.network.normalize import normalize_block
    from cryosiam_dask.network.reference import predict_whole

    t0 = time.perf_counter()
    cfg = load_config(config_path)
    torch.set_num_threads(2)
    ckpt = load_checkpoint(cfg.checkpoint_path)
    model = build_model(ckpt)
    path = cfg.input_files()[0]
    with mrcfile.open(path, permissive=True) as f:
        volume = np.asarray(f.data)
    d = cfg.parameters.data
    x = normalize_block(volume, a_min=d.min, a_max=d.max, mean=d.mean, std=d.std)
    fg, dist, bnd = predict_whole(
        x, model, patch_size=patch_size_of(ckpt), batch_size=cfg.hyper_parameters.batch_size
    )
    with h5py.File(cfg.mask_folder / f"{cfg.stem(path)}_preds.h5") as f:
        mask = f["labels"][...].astype(np.int8)
    fg, dist, bnd = fg * mask, dist * mask, bnd * mask
    n = cfg.parameters.network
    labels = instance_segmentation(
        fg,
        dist,
        bnd,
        min_center_distance=n.min_center_distance,
        max_center_distance=n.max_center_distance,
        boundary_bias=n.boundary_bias,
        threshold_foreground=n.threshold_foreground,
        distance_type=n.distance_type,
    )
    return {"n_instances": int(labels.max()), "compute_s": time.perf_counter() - t0}


def run_ours(config_path: Path, *, tiling: str, workers: int, chunks: list[int]) -> dict[str, Any]:
    """cryosiam_dask on a LocalCluster of ``workers`` processes (started before the clock)."""
    from cryosiam_dask.config import load_config
    from cryosiam_dask.run.cluster import plan_cluster, start_client
    from cryosiam_dask.run.driver import instance_predict

    threads = max(1, 2 // workers)
    cfg = load_config(
        config_path,
        {"tiling": tiling, "chunk_size": tuple(chunks), "device": "cpu", "output_formats": ["cryosiam"]},
    )
    shutil.rmtree(cfg.prediction_folder, ignore_errors=True)  # no resume: every run computes everything
    plan = plan_cluster(device="cpu", n_workers=workers, threads_per_worker=threads, dashboard_address=None)
    with start_client(plan) as client:
        client.run(lambda: None)
        t0 = time.perf_counter()
        res = instance_predict(cfg, client=client)
        return {"n_instances": res[0].n_instances, "compute_s": time.perf_counter() - t0}


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and measure it."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if spec["impl"] == "original":
            out = run_original(Path(spec["config"]))
        else:
            out = run_ours(
                Path(spec["config"]), tiling=spec["tiling"], workers=spec["workers"], chunks=spec["chunks"]
            )
        wall = time.perf_counter() - t0
    out.update(
        wall_s=wall,
        peak_rss_MiB=mem.peak / 2**20,
        peak_rss_per_process_MiB=sorted((v / 2**20 for v in mem.per_process.values()), reverse=True),
    )
    return out


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    return spawn_one("benchmarks.bench_pipeline", spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--chunks", type=int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--arch", choices=["tiny", "real"], default="tiny")
    p.add_argument("--scales", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--skip-compare", action="store_true", help="only the scaling table")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    work = args.out / "bench_pipeline_data"
    shape = tuple(args.shape)
    rows: list[dict[str, Any]] = []
    if not args.skip_compare:
        cfg = make_case(work / "x1", shape, args.arch)
        specs = [{"impl": "original"}] + [
            {"impl": "cryosiam_dask", "tiling": t, "workers": w} for t in ("fast", "exact") for w in (1, 2)
        ]
        for spec in specs:
            spec.update(config=str(cfg), chunks=args.chunks, shape=list(shape))
            r = _spawn(spec)
            r.update(spec, voxels_per_s=float(np.prod(shape)) / r["compute_s"])
            rows.append(r)
        base = rows[0]
        for r in rows:
            r["speedup_vs_original"] = base["compute_s"] / r["compute_s"]
            r["memory_vs_original"] = r["peak_rss_MiB"] / base["peak_rss_MiB"]
            r["name"] = r["impl"] if r["impl"] == "original" else f"{r['impl']} {r['tiling']} x{r['workers']}"
        print(f"\n## Pipeline, {shape} voxels, {args.arch} architecture, chunks {args.chunks}\n")
        print(
            table(
                rows,
                [
                    "name",
                    "compute_s",
                    "wall_s",
                    "voxels_per_s",
                    "peak_rss_MiB",
                    "speedup_vs_original",
                    "memory_vs_original",
                    "n_instances",
                ],
            )
        )
    scaling: list[dict[str, Any]] = []
    for s in args.scales:
        sshape = (
            shape[0],
            shape[1] * (2 if s >= 2 else 1) * (2 if s >= 8 else 1),
            shape[2] * (2 if s >= 4 else 1),
        )
        cfg = make_case(work / f"x{s}", sshape, args.arch)
        spec = {
            "impl": "cryosiam_dask",
            "tiling": "fast",
            "workers": 2,
            "config": str(cfg),
            "chunks": args.chunks,
        }
        r = _spawn(spec)
        r.update(
            scale=s,
            shape=list(sshape),
            voxels=int(np.prod(sshape)),
            voxels_per_s=float(np.prod(sshape)) / r["compute_s"],
        )
        scaling.append(r)
    if scaling:
        print(f"\n## Scaling, cryosiam_dask fast, 2 workers, chunks {args.chunks}\n")
        print(
            table(
                scaling,
                ["scale", "shape", "compute_s", "wall_s", "voxels_per_s", "peak_rss_MiB", "n_instances"],
            )
        )
    path = write_results(
        args.out, f"bench_pipeline_{args.arch}", vars(args) | {"out": str(args.out)}, rows + scaling
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
