"""The multicut's extra cost on the demo case: ``postprocessing: False`` vs ``True``, same maps, one run each.

The demo's inputs (synthetic tomogram, lamella, engineered tiny checkpoint) go through ``instance_predict``
twice on an in-process threads cluster; the second run reuses the first one's maps store, so the
difference is the post-processing alone. Prints the instance and multicut stage seconds, the ratio of the
multicut to the watershed stage, and the instance counts; writes JSON.

    python -m benchmarks.bench_multicut --shape 64 128 128 --chunks 64 128 128
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from benchmarks._common import table, write_results


def run(shape: tuple[int, int, int], chunks: tuple[int, int, int], workers: int) -> list[dict]:
    from distributed import Client, LocalCluster

    from cryosiam_dask.config import load_config
    from cryosiam_dask.demo import write_demo_inputs
    from cryosiam_dask.run.driver import instance_predict

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_multicut_") as tmp:
        cfg_path = write_demo_inputs(Path(tmp), shape=shape)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            for post in (False, True):
                data = yaml.safe_load(cfg_path.read_text())
                data["parameters"]["network"]["postprocessing"] = post
                cfg_path.write_text(yaml.safe_dump(data))
                cfg = load_config(cfg_path, {"chunk_size": list(chunks), "output_formats": ["cryosiam"]})
                [res] = instance_predict(cfg, client=client)
                sec = res.report["stage_seconds"]
                rows.append({"postprocessing": post, "instances_s": round(sec["instances"], 2),
                             "multicut_s": round(sec.get("multicut", 0.0), 2),
                             "outputs_s": round(sec["outputs"], 2), "n_instances": res.n_instances,
                             "n_watershed": res.report.get("n_watershed_instances", res.n_instances)})
    ws = rows[0]["instances_s"]
    for r in rows:
        r["multicut_vs_watershed"] = round(r["multicut_s"] / ws, 2) if ws else None
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128])
    p.add_argument("--chunks", type=int, nargs=3, default=[64, 128, 128])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    rows = run(tuple(args.shape), tuple(args.chunks), args.workers)
    print(table(rows, list(rows[0])))
    write_results(args.out, "bench_multicut", {"shape": args.shape, "chunks": args.chunks,
                                               "workers": args.workers}, rows)
    return rows


if __name__ == "__main__":
    main()
