"""Exact is the fast path: the whole-volume tiling of the original vs chunked ``exact`` and ``fast``.

One synthetic tomogram with a lamella slab (``--lamella`` fractions of z), the real architecture with
engineered particle-finding weights plus a random part that every weight feeds (``write_checkpoint(...,
engineered=True, random_part=...)``: the maps find the particles and depend on the tiling as a trained
network's do). Rows per lamella case:

- ``baseline``: :func:`~cryosiam_dask.network.reference.predict_whole` in this process, the network in
  ``channels_last_3d`` (flattered as a user of the original could), maps × mask;
- ``exact`` at each ``--chunkings`` (``whole`` = one chunk) on a process LocalCluster;
- ``fast`` at ``--fast-chunks`` (default the last chunking), in float32 and with each ``--fast-amp``
  (opt-in autocast, default bf16).

Columns: wall and network time, output voxels/s, speed-up and wall ratio vs the baseline, peak RSS of the
largest process and of all processes together (and their ratios), max-abs of each map vs the baseline, and the
instances (CryoSiam's watershed post-processing on the whole maps): identical to the baseline's (``exact``) or
F1 at IoU 0.5 (``fast``). JSON beside the configuration in ``--out``.

    python -m benchmarks.bench_exact                       # 2.5 M voxels, 70 % and 30 % lamellae
    python -m benchmarks.bench_exact --shape 32 64 64 --chunkings whole 32,32,32 --lamella 0.7  # smoke
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
POST = dict(threshold_foreground=0.5, min_center_distance=1.0, max_center_distance=4.0, distance_type=1)
"""The demo's post-processing settings (``cryosiam_dask.demo.demo_config``)."""


def lamella_mask(shape: tuple[int, int, int], fraction: float) -> np.ndarray:
    """int8 slab covering the central `fraction` of z (1 inside)."""
    z = shape[0]
    lo = int(round(z * (1 - fraction) / 2))
    hi = lo + int(round(z * fraction))
    mask = np.zeros(shape, np.int8)
    mask[lo:hi] = 1
    return mask


def f1_at(truth: np.ndarray, found: np.ndarray, iou: float = 0.5) -> float:
    """F1 of one-to-one instance matches at IoU >= `iou` (both label volumes (Z, Y, X), 0 = background)."""
    from cryosiam_dask.demo import match_instances

    n_t, n_f = len(np.unique(truth)) - 1, len(np.unique(found)) - 1
    if n_t + n_f == 0:
        return 1.0
    return 2 * match_instances(truth, found, iou=iou) / (n_t + n_f)


class ChannelsLast:
    """The original network with its input in ``channels_last_3d`` (the module is converted too)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model.to(memory_format=torch.channels_last_3d)
        self._fmt = torch.channels_last_3d

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, x: Any) -> Any:
        return self.model(x.contiguous(memory_format=self._fmt))


def instances(maps: tuple[np.ndarray, ...]) -> np.ndarray:
    from cryosiam_dask.instances.reference import instance_segmentation

    return instance_segmentation(maps[0], maps[1], **POST)


def run_baseline(volume: np.ndarray, ckpt: Path, batch_size: int) -> tuple[dict, tuple]:
    """The original's tiling in this process (channels_last_3d), one warm-up patch first.

    The original evaluates every patch whatever the lamella, so its network runs once here and each lamella
    case adds only its mask multiplication (:func:`masked`).
    """
    import torch

    from cryosiam_dask.network import normalize, reference
    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model

    c = load_checkpoint(ckpt)
    model, patch = ChannelsLast(build_model(c)), patch_size_of(c)
    reference.run_original(model, np.zeros((1, *patch), np.float32))  # warm-up
    norm = normalize.normalize_block(volume, a_min=0, a_max=1, mean=0, std=1)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        maps = reference.predict_whole(norm, model, patch_size=patch, batch_size=batch_size)
        net = time.perf_counter() - t0
    row = {"run": "baseline", "chunks": "whole", "network_s": net, "mem": mem,
           "torch_threads": torch.get_num_threads()}
    return row, maps


def masked(base: dict, maps: tuple, mask: np.ndarray) -> tuple[dict, tuple]:
    """The baseline's maps × the lamella mask, its time added to the network's."""
    t0 = time.perf_counter()
    out = tuple(m * mask for m in maps)
    return {**base, "wall_s": base["network_s"] + time.perf_counter() - t0}, out


def run_chunked(client: Any, volume: Any, mask: Any, ckpt: Path, tiling: str, chunks: tuple[int, ...],
                batch_size: int, amp: str | None = None) -> tuple[dict, tuple]:
    """One chunked tiling on the cluster (the network is already loaded in every worker)."""
    import dask.array as da

    from cryosiam_dask.network import predict
    from cryosiam_dask.network import tiling as tl

    tomogram = client.persist(da.from_array(volume, chunks=chunks))
    lamella = client.persist(da.from_array(mask, chunks=chunks))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        lazy = predict.predict_maps(tomogram, ckpt, tiling=tiling, batch_size=batch_size, mask=lamella,
                                    amp=amp)
        maps = tuple(client.compute(list(lazy), sync=True))
        wall = time.perf_counter() - t0
    patch = (int(ckpt.stem.split("_p")[-1]),) * 3
    row = {"run": tiling if amp is None else f"{tiling} {amp}", "chunks": "x".join(map(str, chunks)),
           "wall_s": wall, "mem": mem}
    if tiling == "exact":
        evals, distinct = tl.exact_patch_evaluations(volume.shape, tomogram.chunks, patch)
        row["patch_evaluations"] = f"{evals}/{distinct}"
        row["patches_skipped"] = predict.patch_skip_fraction(lamella, patch)
    return row, maps


def parse_chunks(text: str, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if text == "whole":
        return shape
    edges = tuple(int(v) for v in text.split(","))
    return edges * 3 if len(edges) == 1 else edges  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[160, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--lamella", type=float, nargs="+", default=[0.7, 0.3], help="fractions of z")
    p.add_argument("--chunkings", nargs="+", default=["whole", "32,64,64", "80,128,128"],
                   help="'whole' or z,y,x edges")
    p.add_argument("--fast-chunks", default=None,
                   help="chunking of the fast run (default: the last chunking; fast's windows lie on a "
                   "grid of the volume, so its maps do not depend on it)")
    p.add_argument("--fast-amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "fp16"],
                   help="fast runs: float32 ('none', the default tiling's precision) and opt-in autocast")
    p.add_argument("--random-part", type=float, default=0.05)
    p.add_argument("--arch", choices=["real", "tiny"], default="real", help="tiny: a smoke test")
    p.add_argument("--patch", type=int, default=None, help="default 64 (real), 32 (tiny)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--all-runs", action="store_true",
                   help="every run in every lamella case (default: after the first case, the baseline and "
                   "exact at the first non-whole chunking only)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)

    import dask
    from distributed import Client, LocalCluster

    from cryosiam_dask.network import runtime
    from cryosiam_dask.testing.checkpoints import write_checkpoint
    from cryosiam_dask.testing.synthetic import make_tomogram

    shape = tuple(args.shape)
    args.patch = args.patch or (64 if args.arch == "real" else 32)
    chunkings = [parse_chunks(c, shape) for c in args.chunkings]
    split = next((c for c in chunkings if c != shape), chunkings[0])
    fast_chunks = parse_chunks(args.fast_chunks, shape) if args.fast_chunks else chunkings[-1]
    config = {"shape": shape, "voxels": int(np.prod(shape)), "lamella": args.lamella,
              "chunkings": chunkings, "arch": args.arch, "patch": args.patch, "random_part": args.random_part,
              "batch_size": args.batch_size, "workers": args.workers, "threads_per_worker": 1,
              "baseline": "predict_whole, channels_last_3d, torch default threads", "post": POST}
    n = int(np.prod(shape))
    volume = make_tomogram(shape, n_particles=max(4, n // 25000), radii=(5, 8), seed=0).tomogram
    volume = volume.astype(np.float32)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / f"{args.arch}_p{args.patch}.ckpt", arch=args.arch,
                                patch_size=args.patch, engineered=True, random_part=args.random_part)
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # see bench_inference: it makes torch page-fault
        whole, whole_maps = run_baseline(volume, ckpt, args.batch_size)
        for case, fraction in enumerate(args.lamella):
            mask = lamella_mask(shape, fraction)
            base, ref = masked(whole, whole_maps, mask)
            ref_labels = instances(ref)
            base["instances"] = int(ref_labels.max())
            case_rows = [base]
            runs = [("exact", c, None) for c in chunkings]
            runs += [("fast", fast_chunks, None if a == "none" else a) for a in args.fast_amp]
            if case and not args.all_runs:
                runs = [("exact", split, None)]
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster, Client(cluster) as client:
                client.run(runtime.get_network, str(ckpt))  # warm-up: the network once in every worker
                for tiling, chunks, amp in runs:
                    row, maps = run_chunked(client, volume, mask, ckpt, tiling, chunks, args.batch_size, amp)
                    for name, a, b in zip(MAPS, maps, ref, strict=True):
                        row[f"{name}_max_abs"] = float(np.abs(a - b).max())
                    labels = instances(maps)
                    row["instances"] = int(labels.max())
                    if tiling == "exact":
                        row["instances_identical"] = bool(np.array_equal(labels, ref_labels))
                    row["f1_vs_baseline"] = f1_at(ref_labels, labels)
                    case_rows.append(row)
            for r in case_rows:
                mem = r.pop("mem") if r is not base else r["mem"]
                r["lamella"] = fraction
                r["voxels_per_s"] = n / r["wall_s"]
                r["wall_vs_baseline"] = r["wall_s"] / base["wall_s"]
                r["largest_rss_GiB"] = max(mem.per_process.values()) / 2**30
                r["all_rss_GiB"] = mem.peak / 2**30
            base.pop("mem")
            for r in case_rows:
                r["largest_rss_vs_baseline"] = r["largest_rss_GiB"] / base["largest_rss_GiB"]
            rows += case_rows
            print(table(case_rows, ["run", "lamella", "chunks", "wall_s", "voxels_per_s", "wall_vs_baseline",
                                    "largest_rss_GiB", "largest_rss_vs_baseline", "all_rss_GiB",
                                    "patch_evaluations", "patches_skipped"]))
            print(table(case_rows, ["run", "chunks", *(f"{m}_max_abs" for m in MAPS), "instances",
                                    "instances_identical", "f1_vs_baseline"]), flush=True)
    path = write_results(args.out, f"bench_exact_{'x'.join(map(str, shape))}", config, rows)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
