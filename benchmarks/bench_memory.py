"""Bounded memory: peak RSS of every process depends on chunk size x workers, not on the tomogram.

Each run writes (slab by slab, never holding the volume) a synthetic MRC tomogram of bright particles, a
full-size lamella mask h5 (chunked, written chunk by chunk with h5py), an engineered checkpoint and a config,
then runs the whole ``instance_predict`` (MRC -> zarr, maps, instances, outputs) on a
``distributed.LocalCluster(processes=True, n_workers=..., memory_limit=...)`` started here, while sampling
the RSS of this process and of every worker process (and the nannies). Every run is a fresh subprocess, so a
run's peaks are not polluted by an earlier one.

    python -m benchmarks.bench_memory --shape 64 128 256 --chunks 64 128 128 --workers 2 \
        --memory-limit 1GB --scales 1 2 4 8 16 --big-factor 0

``--scales`` grows the volume along z (``--grow z``, default) or along y and x (``--grow yx``) at fixed
chunks. ``--big-factor F`` (default 4) adds one run whose tomogram (as float32) is at least F times the total
worker memory limit (n_workers x limit), growing z; on 2 CPU cores that run takes hours (see the log's
estimate). The network is a very small engineered CryoSiam architecture (``--arch``, default ``small``:
1-channel backbone, heads [2, 1]); it segments bright particles like the tiny one, only faster on CPU.

Timings on a shared machine are noisy; the peaks are the point.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import PeakRSS, spawn_one, table, write_results

logger = logging.getLogger("benchmarks.bench_memory")

ARCHS: dict[str, Any] = {
    "tiny": "tiny",
    "small": {
        "num_filters": [1, 1, 1, 1],
        "fpn_channels": 1,
        "dim": 1,
        "pred_dim": 1,
        "dense_dim": 1,
        "dense_pred_dim": 1,
        "filters": [2, 1],
    },
}
"""``small``: the smallest CryoSiam layout the engineered weights fit in (channel 0 carries the maps; the
boundary head needs 2 channels in its first layer)."""

STEM = "TS_mem"
SLAB = 32
"""z-planes of the tomogram and the mask generated at a time."""


def parse_bytes(text: str) -> int:
    """``'600MB'``, ``'1GiB'`` or a plain number of bytes -> bytes (dask's parser)."""
    from dask.utils import parse_bytes as _parse

    return int(_parse(text))


def write_particle_mrc(
    path: Path, shape: tuple[int, int, int], *, seed: int = 0, slab: int = SLAB
) -> tuple[Path, int]:
    """Write a float32 MRC of bright particles (``synthetic.make_tomogram`` per slab) through a memory map.

    Parameters
    ----------
    path : Path
        Output ``.mrc`` (overwritten).
    shape : (3,) tuple of int
        (Z, Y, X).
    seed : int, default 0
        Slab ``i`` uses seed ``seed + i``.
    slab : int, default 32
        z-planes generated at a time; only one slab is ever in memory.

    Returns
    -------
    path : Path
    n_particles : int
        Particles placed (some are cut by slab faces: those are flat-sided, which is fine here).
    """
    import mrcfile

    from cryosiam_dask.testing.synthetic import make_tomogram

    total = 0
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as mrc:
        for i, z0 in enumerate(range(0, shape[0], slab)):
            z1 = min(z0 + slab, shape[0])
            sub = (z1 - z0, shape[1], shape[2])
            n = max(2, int(np.prod(sub) / 20000))
            syn = make_tomogram(sub, n_particles=n, radii=(3, 6), seed=seed + i, touching_pairs=1)
            mrc.data[z0:z1] = syn.tomogram
            total += int(syn.labels.max())
        mrc.voxel_size = 10.0
    return path, total


def write_mask_chunked(
    path: Path, shape: tuple[int, int, int], *, chunks: tuple[int, int, int], fraction: float | None = None
) -> Path:
    """Write a full-size lamella mask (dataset ``labels``, uint8, gzip, chunked) slab by slab with h5py.

    Default: the lamella is z in [Z/16, Z - Z/16), about 12 % of the volume outside it, like a real
    lamella's margins, so a few chunks skip the network. `fraction`: a central slab of that fraction of z
    (a small one makes the network run on a small part while every other stage handles the whole volume).
    """
    import h5py

    if fraction is None:
        lo, hi = shape[0] // 16, shape[0] - shape[0] // 16
    else:
        lo = int(round(shape[0] * (1 - fraction) / 2))
        hi = lo + max(1, int(round(shape[0] * fraction)))
    h5_chunks = tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("labels", shape=shape, dtype=np.uint8, chunks=h5_chunks, compression="gzip")
        for z0 in range(0, shape[0], SLAB):
            z1 = min(z0 + SLAB, shape[0])
            plane = np.zeros((z1 - z0, shape[1], shape[2]), np.uint8)
            plane[max(lo - z0, 0) : max(min(hi, z1) - z0, 0)] = 1
            ds[z0:z1] = plane
    return path


def make_case(
    folder: Path,
    shape: tuple[int, int, int],
    *,
    chunks: tuple[int, int, int],
    halo: int,
    arch: str,
    output_formats: list[str],
    patch_size: int = 32,
    seed: int = 0,
    lamella: float | None = None,
    copick: bool = False,
) -> tuple[Path, int]:
    """Write tomogram, mask, checkpoint and config for ``shape`` in ``folder``; return (config, particles).

    ``copick``: the tomogram and mask become a copick project's run (OME-Zarr, lamella segmentation) and the
    config reads them from there (``cryosiam_dask.copick``) instead of the MRC file.
    """
    import yaml

    from cryosiam_dask.demo import demo_config
    from cryosiam_dask.testing.checkpoints import write_checkpoint

    for sub in ("data", "lamella", "model"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    _, n_particles = write_particle_mrc(folder / "data" / f"{STEM}.mrc", shape, seed=seed)
    write_mask_chunked(folder / "lamella" / f"{STEM}_preds.h5", shape, chunks=chunks, fraction=lamella)
    ckpt = folder / "model" / f"{arch}.ckpt"
    write_checkpoint(ckpt, arch=ARCHS[arch], patch_size=patch_size, engineered=True)
    cfg = demo_config(folder, ckpt, save_raw_predictions=False, chunk_size=tuple(chunks))
    cfg["prediction_folder"] = str(folder / "out")
    cfg["cryosiam_dask"].update(
        halo=halo, tiling="fast", device="cpu", output_formats=output_formats, work_dir=str(folder / "work")
    )
    if copick:
        _to_copick(folder, cfg)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, n_particles


def _to_copick(folder: Path, cfg: dict[str, Any]) -> None:
    """Move the case's tomogram and mask into a copick project and point `cfg` at it."""
    import h5py

    from cryosiam_dask.testing.copick_project import write_copick_project

    with h5py.File(folder / "lamella" / f"{STEM}_preds.h5", "r") as f:
        mask = f["labels"][:]
    project = write_copick_project(
        folder / "copick", {STEM: folder / "data" / f"{STEM}.mrc"}, masks={STEM: mask}
    )
    for key in ("data_folder", "mask_folder", "test_files", "file_extension"):
        cfg.pop(key)
    cfg["cryosiam_dask"]["copick"] = {
        "config": str(project), "voxel_spacing": 10.0, "tomo_type": "denoised", "object_name": "particle",
        "lamella_segmentation": "lamella",
    }


def _roles(client: Any) -> dict[int, str]:
    """pid -> role (``main``, ``worker-i``, ``nanny-i``) for the processes of this run."""
    workers = client.run(os.getpid)
    nannies = client.run(os.getppid)
    roles = {os.getpid(): "main"}
    for i, addr in enumerate(sorted(workers)):
        roles[workers[addr]] = f"worker-{i}"
        roles.setdefault(nannies[addr], f"nanny-{i}")
    return roles


class _StageMarks(logging.Handler):
    """On each ``stage ...`` record of the pipeline, snapshot the peaks seen so far (pid -> bytes)."""

    def __init__(self, mem: PeakRSS) -> None:
        super().__init__(logging.INFO)
        self.mem = mem
        self.marks: dict[str, dict[int, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("stage ") and record.args:
            self.mem.sample()
            self.marks[str(record.args[0])] = dict(self.mem.per_process)


def run_once(
    config_path: Path, *, workers: int, threads: int, memory_limit: str, interval: float = 0.05
) -> dict[str, Any]:
    """Run ``instance_predict`` on a fresh LocalCluster while sampling every process's RSS.

    Returns
    -------
    dict
        ``wall_s`` (instance_predict only, the cluster already up), ``peak_rss_MiB`` (sum over the process
        tree), ``peak_main_MiB``, ``peak_worker_MiB`` (largest worker), ``peak_by_role_MiB`` (role -> MiB),
        ``n_instances``, ``stage_s``.
    """
    from distributed import Client, LocalCluster

    from cryosiam_dask.config import load_config
    from cryosiam_dask.run.driver import instance_predict

    cfg = load_config(config_path)
    pipeline_log = logging.getLogger("cryosiam_dask")  # the "stage ..." records of the stages module
    with PeakRSS(interval=interval) as mem:
        marks = _StageMarks(mem)
        pipeline_log.addHandler(marks)
        if pipeline_log.getEffectiveLevel() > logging.INFO:
            pipeline_log.setLevel(logging.INFO)
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            roles = _roles(client)
            t0 = time.perf_counter()
            res = instance_predict(cfg, client=client)
            wall = time.perf_counter() - t0
            limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
        pipeline_log.removeHandler(marks)
    by_stage = {
        stage: {roles[pid]: rss / 2**20 for pid, rss in peaks.items() if pid in roles}
        for stage, peaks in marks.marks.items()
    }
    by_role = {roles.get(pid, f"other-{pid}"): rss / 2**20 for pid, rss in mem.per_process.items()}
    workers_mib = [v for k, v in by_role.items() if k.startswith("worker-")]
    return {
        "wall_s": wall,
        "peak_rss_MiB": mem.peak / 2**20,
        "peak_main_MiB": by_role.get("main", 0.0),
        "peak_worker_MiB": max(workers_mib, default=0.0),
        "peak_by_role_MiB": dict(sorted(by_role.items())),
        "peak_after_stage_MiB": by_stage,
        "worker_memory_limit_MiB": sum(limits) / 2**20,
        "n_instances": res[0].n_instances,
        "stage_s": res[0].report.get("stage_seconds", {}),
        "oversized": res[0].report.get("n_oversized", res[0].report.get("oversized")),
    }


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    return spawn_one("benchmarks.bench_memory", spec)


def _one(spec: dict[str, Any]) -> dict[str, Any]:
    """Generate the case of ``spec`` and run it (in this, a fresh, process)."""
    folder = Path(spec["folder"])
    t0 = time.perf_counter()
    config, n_particles = make_case(
        folder,
        tuple(spec["shape"]),
        chunks=tuple(spec["chunks"]),
        halo=spec["halo"],
        arch=spec["arch"],
        output_formats=spec["output_formats"],
        patch_size=spec.get("patch_size", 32),
        lamella=spec.get("lamella"),
        copick=spec.get("copick", False),
    )
    make_s = time.perf_counter() - t0
    out = run_once(
        config, workers=spec["workers"], threads=spec["threads"], memory_limit=spec["memory_limit"]
    )
    out.update(make_s=make_s, n_particles=n_particles)
    if not spec.get("keep"):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return out


def big_shape(
    shape: tuple[int, int, int], total_limit: int, factor: float, chunks: tuple[int, int, int]
) -> tuple[int, int, int]:
    """``shape`` grown along z (whole chunks) until float32 bytes >= factor x total_limit."""
    plane = 4 * shape[1] * shape[2]
    z = math.ceil(factor * total_limit / plane / chunks[0]) * chunks[0]
    return (max(z, shape[0]), shape[1], shape[2])


def scaled_shape(shape: tuple[int, int, int], s: int, grow: str = "z") -> tuple[int, int, int]:
    """x1, x2, x4, x8...: ``grow="z"`` multiplies Z; ``"yx"`` doubles Y, then X, alternately."""
    z, y, x = shape
    if grow == "z":
        return (z * s, y, x)
    k = int(round(math.log2(s)))
    return (z, y * 2 ** ((k + 1) // 2), x * 2 ** (k // 2))


COLUMNS = [
    "name",
    "shape",
    "tomogram_GiB",
    "worker_limit_total_MiB",
    "tomogram_over_limit",
    "peak_main_MiB",
    "peak_worker_0_MiB",
    "peak_worker_1_MiB",
    "peak_total_MiB",
    "wall_s",
    "voxels_per_s",
    "n_instances",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"))
    p.add_argument("--chunks", type=int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--halo", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--memory-limit", default="1GB", help="per worker")
    p.add_argument("--patch-size", type=int, default=32, help="network patch edge (fast window = 2x)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="small")
    p.add_argument("--scales", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument(
        "--grow", choices=["z", "yx"], default="z", help="axes the scales multiply (yx: larger planes)"
    )
    p.add_argument("--big-factor", type=float, default=4.0, help="0: no big run")
    p.add_argument("--lamella", type=float, default=None,
                   help="lamella slab as a fraction of z in the big run (default: z in [Z/16, Z - Z/16))")
    p.add_argument("--lamella-all", action="store_true", help="--lamella in every run, not only the big one")
    p.add_argument("--output-formats", nargs="+", default=["cryosiam", "ome-zarr"])
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.one:
        print(json.dumps(_one(json.loads(args.one))))
        return
    shape, chunks = tuple(args.shape), tuple(args.chunks)
    total_limit = args.workers * parse_bytes(args.memory_limit)
    runs = [(f"x{s}", scaled_shape(shape, s, args.grow)) for s in args.scales]
    if args.big_factor > 0:
        runs.append(
            (f"big (>= {args.big_factor:g}x limit)", big_shape(shape, total_limit, args.big_factor, chunks))
        )
    rows: list[dict[str, Any]] = []
    for name, sshape in runs:
        spec = {
            "name": name,
            "folder": str(args.out / "bench_memory_data" / name.split()[0]),
            "shape": list(sshape),
            "chunks": list(chunks),
            "halo": args.halo,
            "arch": args.arch,
            "workers": args.workers,
            "threads": args.threads,
            "memory_limit": args.memory_limit,
            "output_formats": args.output_formats,
            "patch_size": args.patch_size,
            "lamella": args.lamella if name.startswith("big") or args.lamella_all else None,
            "keep": args.keep,
        }
        if rows:
            logger.info(
                "run %s: shape %s, about %.0f s at the last run's %.0f voxels/s",
                name,
                sshape,
                np.prod(sshape) / rows[-1]["voxels_per_s"],
                rows[-1]["voxels_per_s"],
            )
        r = _spawn(spec)
        voxels = int(np.prod(sshape))
        r.update(spec)
        r.update(
            voxels=voxels,
            tomogram_GiB=4 * voxels / 2**30,
            worker_limit_total_MiB=total_limit / 2**20,
            tomogram_over_limit=4 * voxels / total_limit,
            peak_total_MiB=r["peak_rss_MiB"],
            voxels_per_s=voxels / r["wall_s"],
            **{f"peak_{k.replace('-', '_')}_MiB": v for k, v in r["peak_by_role_MiB"].items()},
        )
        rows.append(r)
        logger.info("%s: %s", name, {k: r[k] for k in ("wall_s", "peak_total_MiB", "peak_worker_MiB")})
    print(
        f"\n## Bounded memory: instance_predict, {args.workers} worker processes x {args.threads} thread, "
        f"memory_limit {args.memory_limit} each, chunks {list(chunks)}, halo {args.halo}, arch {args.arch}\n"
    )
    print(table(rows, COLUMNS))
    path = write_results(args.out, f"bench_memory_{args.grow}", vars(args) | {"out": str(args.out)}, rows)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
