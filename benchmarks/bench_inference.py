"""Network stage: the original's whole-volume tiling vs the chunked ``exact`` and ``fast`` tilings.

One synthetic tomogram and one checkpoint, three runs: (a) ``inference.predict_whole`` in this process (the
original's in-memory 50 %-overlap tiling), (b) ``predict_maps(tiling="exact")`` and (c) ``tiling="fast"``
on a process LocalCluster (``--workers`` workers of one thread each). Prints output voxels/s, peak RSS (this
process plus its workers, sampled) and the ratios against (a), and the fast-vs-exact difference per map;
writes the configuration and results as JSON to ``--out``.

``--arch tiny`` uses the golden fixture's checkpoint (patch 32; random weights on every layer plus a smoothed
pass-through) when it is there; otherwise, and for ``real``, ``synthetic_model.write_checkpoint`` with seeded
random weights (``--engineered`` for the particle-segmenting weights, whose maps depend on a small
neighbourhood only, so fast and exact then agree exactly and the difference says nothing).

    python -m benchmarks.bench_inference --shape 48 80 80 --arch tiny --chunks 48
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import PeakRSS, table, write_results

MAPS = ("foreground", "distance", "boundary")


GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cryosiam_golden"
GOLDEN_CKPT = GOLDEN / "model" / "cryosiam_instance_tiny.ckpt"


def setup(
    shape: tuple[int, int, int], arch: str, patch: int | None, folder: Path, engineered: bool
) -> tuple[np.ndarray, Path, int]:
    """Synthetic tomogram (float32, [0, 1]), a CryoSiam-layout checkpoint of `arch`, and its patch edge."""
    from cryosiam_dask.testing.checkpoints import write_checkpoint
    from cryosiam_dask.testing.synthetic import make_tomogram

    n = max(4, int(np.prod(shape) / 20000))
    volume = make_tomogram(shape, n_particles=n, radii=(4, 7), seed=0).tomogram.astype(np.float32)
    if arch == "tiny" and patch in (None, 32) and not engineered and GOLDEN_CKPT.is_file():
        return volume, GOLDEN_CKPT, 32
    patch = patch or (32 if arch == "tiny" else 64)
    ckpt = write_checkpoint(folder / f"{arch}.ckpt", arch=arch, patch_size=patch, engineered=engineered)
    return volume, Path(ckpt), patch


def time_whole(volume: np.ndarray, ckpt: Path, batch_size: int) -> tuple[dict[str, Any], tuple]:
    """(a) the original's tiling in this process; warm-up on one patch first."""
    import torch

    from cryosiam_dask.network import normalize, reference
    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model

    c = load_checkpoint(ckpt)
    model, patch = build_model(c), patch_size_of(c)
    reference.run_original(model, np.zeros((1, *patch), np.float32))  # warm-up
    norm = normalize.normalize_block(volume, a_min=0, a_max=1, mean=0, std=1)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        maps = reference.predict_whole(norm, model, patch_size=patch, batch_size=batch_size)
        wall = time.perf_counter() - t0
    return {"run": "whole (original)", "wall_s": wall, "peak_rss_GiB": mem.peak / 2**30,
            "torch_threads": torch.get_num_threads()}, maps


def time_chunked(client, tomogram, ckpt: Path, tiling: str, batch_size: int, **kw: Any) -> tuple[dict, list]:
    """(b)/(c) one chunked tiling on the cluster (the network is already loaded in every worker)."""
    from cryosiam_dask.network import predict
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        lazy = predict.predict_maps(tomogram, ckpt, tiling=tiling, batch_size=batch_size, **kw)
        maps = client.compute(list(lazy), sync=True)
        wall = time.perf_counter() - t0
    return {"run": f"chunked {tiling}", "wall_s": wall, "peak_rss_GiB": mem.peak / 2**30}, maps


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[48, 80, 80], metavar=("Z", "Y", "X"))
    p.add_argument("--arch", choices=["tiny", "real"], default="tiny")
    p.add_argument("--chunks", type=int, nargs="+", default=[48], help="one edge or (z, y, x)")
    p.add_argument("--patch", type=int, default=None, help="patch edge (default 32 tiny, 64 real)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--margin", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--engineered", action="store_true", help="particle-segmenting synthetic weights")
    p.add_argument("--malloc-trim", action="store_true",
                   help="keep distributed's MALLOC_TRIM_THRESHOLD_=65536 in the workers (slows torch ~1.7x)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    from cryosiam_dask.network import runtime
    from cryosiam_dask.network import tiling as tl
    shape = tuple(args.shape)
    chunks = tuple(args.chunks) * 3 if len(args.chunks) == 1 else tuple(args.chunks)
    patch = args.patch
    config = {"shape": shape, "chunks": chunks, "arch": args.arch, "patch": patch,
              "batch_size": args.batch_size, "workers": args.workers, "threads_per_worker": 1,
              "margin": args.margin, "window": args.window, "engineered": args.engineered,
              "malloc_trim_threshold": args.malloc_trim}
    with tempfile.TemporaryDirectory() as tmp:
        volume, ckpt, patch = setup(shape, args.arch, patch, Path(tmp), args.engineered)
        config["patch"], config["checkpoint"] = patch, str(ckpt)
        whole, ref = time_whole(volume, ckpt, args.batch_size)
        rows = [whole]
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        if not args.malloc_trim:  # a fixed trim threshold disables glibc's dynamic mmap threshold: every
            environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # large torch buffer is then mmap'ed and page-faulted
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster, Client(cluster) as client:
            tomogram = client.persist(da.from_array(volume, chunks=chunks))
            client.run(runtime.get_network, str(ckpt))  # warm-up: load the network once in every worker
            exact, exact_maps = time_chunked(client, tomogram, ckpt, "exact", args.batch_size)
            fast, fast_maps = time_chunked(client, tomogram, ckpt, "fast", args.batch_size,
                                           margin=args.margin, window=args.window)
        evals, distinct = tl.exact_patch_evaluations(shape, tomogram.chunks, (patch,) * 3)
        exact["patch_evaluations"] = f"{evals} ({distinct} distinct)"
        for name, e, w, f in zip(MAPS, exact_maps, ref, fast_maps, strict=True):
            exact[f"{name}_vs_whole_max"] = float(np.abs(e - w).max())
            fast[f"{name}_vs_exact_max"] = float(np.abs(f - e).max())
            fast[f"{name}_vs_exact_mean"] = float(np.abs(f - e).mean())
        rows += [exact, fast]
    n = int(np.prod(shape))
    for r in rows:
        r["voxels_per_s"] = n / r["wall_s"]
        r["speedup_vs_whole"] = whole["wall_s"] / r["wall_s"]
        r["rss_ratio_vs_whole"] = r["peak_rss_GiB"] / whole["peak_rss_GiB"]
    print(table(rows, ["run", "wall_s", "voxels_per_s", "speedup_vs_whole", "peak_rss_GiB",
                       "rss_ratio_vs_whole"]))
    print(table(rows[1:2], ["run", "patch_evaluations", *(f"{m}_vs_whole_max" for m in MAPS)]))
    print(table(rows[2:], ["run", *(f"{m}_vs_exact_{s}" for m in MAPS for s in ("max", "mean"))]))
    path = write_results(args.out, f"bench_inference_{args.arch}_{'x'.join(map(str, shape))}", config, rows)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
