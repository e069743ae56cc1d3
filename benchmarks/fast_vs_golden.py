"""``tiling: fast`` (its defaults) and ``exact`` against the original's outputs on the golden case.

Reads ``tests/fixtures/cryosiam_golden`` (tomogram, lamella mask, tiny checkpoint, the original's maps and
instances), predicts the maps with each tiling in this process (synchronous scheduler), runs the golden
post-processing (``postprocessing/settings.json`` ``a_default``) and prints, per tiling: max and mean |Δ| of
each map vs the original's, the fraction of voxels with the same foreground decision, the instances and how
many of the original's are matched one-to-one at IoU ≥ 0.5 (F1).

    python -m benchmarks.fast_vs_golden
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import table
from benchmarks.bench_exact import f1_at

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cryosiam_golden"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import dask
    import h5py
    import mrcfile

    from cryosiam_dask.api import predict, segment
    from cryosiam_dask.demo import match_instances
    from cryosiam_dask.instances.reference import from_original_kwargs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden", type=Path, default=GOLDEN)
    args = p.parse_args(argv)
    g = args.golden
    if not g.is_dir():
        raise SystemExit(f"golden fixture folder not found: {g}")
    volume = mrcfile.read(g / "data" / "TS_tiny.mrc").astype(np.float32)
    with h5py.File(g / "lamella" / "TS_tiny_preds.h5") as f:
        mask = f["labels"][:].astype(np.int8)
    with h5py.File(g / "predictions" / "TS_tiny_preds.h5") as f:
        ref = [f[k][:] for k in ("foreground", "distances", "boundaries")]
    with h5py.File(g / "predictions" / "TS_tiny_instance_preds.h5") as f:
        ref_labels = f["instances"][:]
    kw = json.loads((g / "postprocessing" / "settings.json").read_text())["a_default"]["kwargs"]
    post = from_original_kwargs(kw)
    rows = [{"run": "original", "instances": len(np.unique(ref_labels)) - 1}]
    for tiling in ("exact", "fast"):
        with dask.config.set(scheduler="synchronous"):
            maps = [m.compute() for m in predict(volume, g / "model" / "cryosiam_instance_tiny.ckpt",
                                                 tiling=tiling, mask=mask, chunk_size=volume.shape)]
            labels = segment(maps[0], maps[1], **post).compute()
        row: dict[str, Any] = {"run": tiling}
        for name, got, want in zip(("fg", "dist", "bnd"), maps, ref, strict=True):
            d = np.abs(got - want)
            row[f"{name}_max"], row[f"{name}_mean"] = float(d.max()), float(d.mean())
        t = post["threshold_foreground"]
        row["same_fg_decision"] = float(np.mean((maps[0] > t) == (ref[0] > t)))
        row["instances"] = len(np.unique(labels)) - 1
        row["matched"] = match_instances(ref_labels, labels, iou=0.5)
        row["f1"] = f1_at(ref_labels, labels)
        row["identical_ids"] = bool(np.array_equal(labels, ref_labels))
        rows.append(row)
    print(table(rows, ["run", "fg_max", "fg_mean", "dist_max", "dist_mean", "bnd_max", "bnd_mean",
                       "same_fg_decision", "instances", "matched", "f1", "identical_ids"]))
    return rows


if __name__ == "__main__":
    main()
