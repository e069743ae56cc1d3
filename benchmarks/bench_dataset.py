"""A dataset as a user runs it: N tomograms through ``cryosiam_dask instance_predict`` (default cluster).

Prints the wall, the time to the first ``<stem>_instance_preds.h5`` and its fraction of the wall, the work
dir's peak size (sampled) against the inputs' size, and the CLI process's peak RSS. With ``--compare-src
DIR`` (another checkout of the package, e.g. ``git worktree add /tmp/before <commit>``), the same dataset is
run by that code too, in the same sitting, and the outputs of both are compared.

    git worktree add /tmp/before 0b63086   # the stage-barrier order
    python -m benchmarks.bench_dataset --compare-src /tmp/before --out bench_out       # 12 x 48x96x96
    python -m benchmarks.bench_dataset --n 3 --shape 32 64 64 --arch tiny --out /tmp/b  # smoke
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks._common import table, write_results
from benchmarks.bench_exact import lamella_mask
from cryosiam_dask.run.monitor import tree_bytes


def write_dataset(folder: Path, n: int, shape: tuple[int, ...], ckpt: Path, lamella: float) -> Path:
    """`n` synthetic tomograms (different seeds) with lamella masks and a CryoSiam config; returns it."""
    import yaml

    from cryosiam_dask.demo import demo_config
    from cryosiam_dask.testing.synthetic import make_tomogram, write_mask_h5, write_mrc

    for sub in ("data", "lamella", "predictions"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    mask = lamella_mask(shape, lamella)
    count = max(4, int(np.prod(shape)) // 25000)
    for i in range(n):
        volume = make_tomogram(shape, n_particles=count, radii=(5, 8), seed=i).tomogram
        write_mrc(folder / "data" / f"TS_{i:02d}.mrc", volume.astype(np.float32), voxel_size=10.0)
        write_mask_h5(folder / "lamella" / f"TS_{i:02d}_preds.h5", mask)
    cfg = demo_config(folder, ckpt, save_raw_predictions=False)
    cfg["cryosiam_dask"] = {"output_formats": ["cryosiam"], "dashboard_address": None}
    path = folder / "config_instance.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(config: Path, src: Path | None, flags: list[str]) -> dict[str, Any]:
    """The CLI on the dataset (with `src` first on PYTHONPATH when given), watched while it runs.

    It runs in the dataset's folder: ``python -m`` puts the working directory first on ``sys.path``, so a run
    started in a checkout would import that checkout whatever PYTHONPATH says.
    """
    out = config.parent / "predictions"
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "cryosiam_dask", "instance_predict", "--config_file", str(config), *flags]
    seen: dict[str, float] = {"first": 0.0, "disk": 0, "rss": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=config.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if not seen["first"] and any(out.glob("*_instance_preds.h5")):
                seen["first"] = time.perf_counter() - t0
            seen["disk"] = max(seen["disk"], tree_bytes(out / ".cryosiam_dask"))
            try:
                seen["rss"] = max(seen["rss"], psutil.Process(proc.pid).memory_info().rss)
            except psutil.Error:
                pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "first_output_s": seen["first"], "first_fraction": seen["first"] / wall,
            "work_dir_peak_GiB": seen["disk"] / 2**30, "cli_rss_GiB": seen["rss"] / 2**30}


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    import h5py

    found = {}
    for path in sorted((folder / "predictions").glob("*_instance_preds.h5")):
        with h5py.File(path, "r") as f:
            found[path.name] = f["instances"][...]
    return found


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12, help="tomograms")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96], metavar=("Z", "Y", "X"))
    p.add_argument("--lamella", type=float, default=0.7)
    p.add_argument("--arch", choices=["real", "tiny"], default="real")
    p.add_argument("--compare-src", type=Path, default=None,
                   help="another checkout to run in the same sitting")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    import shutil

    from cryosiam_dask.testing.checkpoints import write_checkpoint

    shape, patch = tuple(args.shape), 64 if args.arch == "real" else 32
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt.ckpt", arch=args.arch, patch_size=patch, engineered=True,
                                random_part=0.05)
        template = write_dataset(Path(tmp) / "template", args.n, shape, ckpt, args.lamella)
        inputs = tree_bytes(template.parent / "data") + tree_bytes(template.parent / "lamella")
        variants = [("this checkout", None, []),
                    ("this checkout, work_dir_cleanup all", None, ["--work-dir-cleanup", "all"])]
        if args.compare_src is not None:
            variants.append((f"{args.compare_src}", args.compare_src.resolve(), []))
        found = []
        for name, src, flags in variants:
            case = Path(tmp) / f"run{len(rows)}"
            shutil.copytree(template.parent, case)
            config = case / "config_instance.yaml"
            config.write_text(config.read_text().replace(str(template.parent), str(case)))
            row = {"code": name, **run(config, src, flags)}
            row["work_dir_peak_x_inputs"] = row["work_dir_peak_GiB"] * 2**30 / inputs
            found.append(labels_of(case))
            rows.append(row)
            shutil.rmtree(case)
    for row, other in zip(rows[1:], found[1:], strict=True):
        row["identical_outputs"] = found[0].keys() == other.keys() and all(
            np.array_equal(found[0][k], other[k]) for k in found[0])
    config = {"n": args.n, "shape": shape, "arch": args.arch, "lamella": args.lamella, "inputs_bytes": inputs}
    path = write_results(args.out, f"bench_dataset_{args.n}x{'x'.join(map(str, shape))}", config, rows)
    print(table(rows, ["code", "wall_s", "first_output_s", "first_fraction", "work_dir_peak_GiB",
                       "work_dir_peak_x_inputs", "cli_rss_GiB", "identical_outputs"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
