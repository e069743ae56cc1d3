"""The run a user starts: ``cryosiam_dask instance_predict`` (default cluster) vs the original, one sitting.

One synthetic tomogram with a lamella slab (``--lamella`` of z), the real architecture with engineered
particle-finding weights plus a random part (as ``bench_exact``). The baseline is the original's pipeline in
this process: the whole tomogram in RAM, ``predict_whole`` (50 % overlap, the network in
``channels_last_3d``, flattering the original), maps x mask, then CryoSiam's watershed post-processing of the
whole volume. Each cryosiam_dask row is the CLI in a fresh process, as a new user types it (``--chunk-size``
only where the row says so), the MRC conversion and every output included; its internal stage seconds are
read from the run's log beside the wall.

Columns: wall and its ratio to the baseline, output voxels/s, peak RSS of the largest process and of the
CLI's process tree, the stage seconds, and the instances: identical
to the baseline's (``exact``) or F1 at IoU 0.5 (``fast``).

    python -m benchmarks.bench_cli --out bench_out           # 160x128x128, 70 % lamella, ~8 min on 2 cores
    python -m benchmarks.bench_cli --shape 32 64 64 --arch tiny --runs exact:whole --out /tmp/b  # smoke
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import PeakRSS, table, write_results
from benchmarks.bench_exact import POST, f1_at, instances, lamella_mask, run_baseline

RUNS = ["exact:default", "exact:whole", "exact:32,64,64", "fast:default"]


def write_case(folder: Path, volume: np.ndarray, mask: np.ndarray, ckpt: Path) -> Path:
    """The tomogram, mask and a CryoSiam config (the demo's post-processing, no multicut) in `folder`."""
    import yaml

    from cryosiam_dask.demo import demo_config
    from cryosiam_dask.testing.synthetic import write_mask_h5, write_mrc

    for sub in ("data", "lamella", "predictions"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_mrc(folder / "data" / "TS_bench.mrc", volume, voxel_size=10.0)
    write_mask_h5(folder / "lamella" / "TS_bench_preds.h5", mask)
    cfg = demo_config(folder, ckpt, save_raw_predictions=False)
    cfg["cryosiam_dask"] = {"output_formats": ["cryosiam"], "dashboard_address": None}
    path = folder / "config_instance.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(config: Path, tiling: str, chunks: str) -> dict[str, Any]:
    """``cryosiam_dask instance_predict`` in a fresh process; wall, memory, stage seconds, labels."""
    import h5py

    cmd = [sys.executable, "-m", "cryosiam_dask", "instance_predict", "--config_file", str(config),
           "--tiling", tiling]
    if chunks == "whole":
        cmd += ["--chunk-size", *(str(s) for s in _shape_of(config))]
    elif chunks != "default":
        cmd += ["--chunk-size", *chunks.split(",")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(interval=0.1, pid=proc.pid) as mem:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    stages = json.loads(re.findall(r"stage seconds (\{.*\})", err)[-1])
    out = config.parent / "predictions"
    with h5py.File(out / "TS_bench_instance_preds.h5", "r") as f:
        labels = f["instances"][...]
    return {"run": tiling, "chunks": chunks, "wall_s": wall, "largest_rss": mem.largest,
            "tree_rss": mem.peak, "stages": stages, "labels": labels}


def _shape_of(config: Path) -> tuple[int, ...]:
    import mrcfile

    with mrcfile.mmap(config.parent / "data" / "TS_bench.mrc", mode="r") as m:
        return tuple(int(s) for s in m.data.shape)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[160, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--lamella", type=float, default=0.7, help="fraction of z inside the lamella")
    p.add_argument("--runs", nargs="+", default=RUNS,
                   help="tiling:chunks, chunks 'default', 'whole' or z,y,x")
    p.add_argument("--random-part", type=float, default=0.05)
    p.add_argument("--arch", choices=["real", "tiny"], default="real", help="tiny: a smoke test")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    import shutil

    from cryosiam_dask.testing.checkpoints import write_checkpoint
    from cryosiam_dask.testing.synthetic import make_tomogram

    shape, patch = tuple(args.shape), 64 if args.arch == "real" else 32
    n = int(np.prod(shape))
    volume = make_tomogram(shape, n_particles=max(4, n // 25000), radii=(5, 8), seed=0).tomogram
    volume, mask = volume.astype(np.float32), lamella_mask(shape, args.lamella)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / f"{args.arch}_p{patch}.ckpt", arch=args.arch, patch_size=patch,
                                engineered=True, random_part=args.random_part)
        t0 = time.perf_counter()
        base, maps = run_baseline(volume, ckpt, args.batch_size)
        ref = instances(tuple(m * mask for m in maps))
        base.update(wall_s=time.perf_counter() - t0, instances=int(ref.max()), largest_rss=base["mem"].peak)
        rows.append(base)
        for spec in args.runs:
            tiling, chunks = spec.split(":")
            case = Path(tmp) / spec.replace(":", "_").replace(",", "x")
            row = run_cli(write_case(case, volume, mask, ckpt), tiling, chunks)
            labels = row.pop("labels")
            row["instances"] = int(labels.max())
            row["identical"] = bool(np.array_equal(labels, ref))
            row["f1"] = f1_at(ref, labels)
            rows.append(row)
            shutil.rmtree(case)
    for r in rows:
        r["ratio"] = r["wall_s"] / rows[0]["wall_s"]
        r["voxels_per_s"] = n / r["wall_s"]
        r["largest_GiB"] = r.pop("largest_rss") / 2**30
        r["tree_GiB"] = r.pop("tree_rss", 0) / 2**30 or ""
        r.pop("mem", None)
    config = {"shape": shape, "voxels": n, "lamella": args.lamella, "arch": args.arch, "patch": patch,
              "post": POST, "runs": args.runs, "baseline": "predict_whole (channels_last_3d) + mask + "
              "instance_segmentation, whole volume, this process"}
    path = write_results(args.out, f"bench_cli_{'x'.join(map(str, shape))}", config, rows)
    print(table(rows, ["run", "chunks", "wall_s", "ratio", "voxels_per_s", "largest_GiB", "tree_GiB",
                       "instances", "identical", "f1", "stages"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
