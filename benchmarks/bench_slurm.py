"""The SLURM paths' overhead: the demo through the CLI on a local cluster, as a SLURMRunner batch job, and on
SLURMCluster worker jobs, on the same inputs and the same number of workers.

Needs a running SLURM (``tests/slurm/start_slurm.sh`` makes a single-node one) and dask-jobqueue. Rows:

- ``local``: ``cryosiam_dask instance_predict`` with 2 local workers of 1 thread (the baseline);
- ``runner``: ``examples/slurm/cryosiam_dask.sbatch`` (scheduler, client and 2 workers in one allocation),
  from ``sbatch`` to the job's end as ``scontrol`` reports it (polled every 0.1 s); the job's own start-up
  (rank start, imports, workers joining) is read from its log;
- ``cluster``: ``examples/slurm/start_cluster.py`` submitting 2 worker jobs (until they joined), then the CLI
  with ``--scheduler-file``; the wall is the sum (a user who keeps the cluster pays the first part once).

Every row's instances are compared with the local run's.

    python -m benchmarks.bench_slurm --out bench_out                     # demo 64x128x128, ~2 min on 2 cores
    python -m benchmarks.bench_slurm --shape 32 64 64 --runs local runner --out /tmp/b     # smoke
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._common import table, write_results

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "slurm"
# the single-node test SLURM has 2 CPUs: 4 tasks (scheduler, client, 2 workers of 1 thread) overcommitted
JOB_FLAGS = ["--ntasks=4", "--cpus-per-task=1", "--overcommit", "--mem-per-cpu=1500M", "--time=00:20:00"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def env() -> dict[str, str]:
    """What the jobs inherit: this interpreter's bin first on PATH, this checkout first on PYTHONPATH."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return e


def config_for(base: Path, name: str) -> Path:
    """A copy of the demo config writing into its own prediction folder."""
    cfg = yaml.safe_load(base.read_text())
    folder = base.parent / name
    folder.mkdir(exist_ok=True)
    cfg["prediction_folder"] = str(folder)
    cfg["save_raw_predictions"] = False
    cfg["cryosiam_dask"] = {**cfg.get("cryosiam_dask", {}), "dashboard_address": None,
                            "output_formats": ["cryosiam"]}
    path = base.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def instances(config: Path) -> dict[str, np.ndarray]:
    import h5py

    folder = Path(yaml.safe_load(config.read_text())["prediction_folder"])
    out = {}
    for p in sorted(folder.glob("*_instance_preds.h5")):
        with h5py.File(p, "r") as f:
            out[p.name] = f["instances"][:]
    return out


def cli(config: Path, *flags: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(["cryosiam_dask", "instance_predict", "--config_file", str(config), *flags],
                          env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return time.perf_counter() - t0


def run_local(config: Path) -> dict[str, Any]:
    return {"wall_s": cli(config, "--n-workers", "2", "--threads-per-worker", "1")}


def run_runner(config: Path) -> dict[str, Any]:
    cwd = config.parent
    (cwd / "logs").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    job_id = subprocess.run(["sbatch", "--parsable", *JOB_FLAGS, str(EXAMPLES / "cryosiam_dask.sbatch"),
                             str(config)], cwd=cwd, env=env(), capture_output=True, text=True,
                            check=True).stdout.strip().split(";")[0]
    state, started = "", None
    while state not in ENDED:
        time.sleep(0.1)
        record = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                                text=True).stdout
        state = dict(re.findall(r"(\w+)=(\S*)", record)).get("JobState", "")
        if started is None and state == "RUNNING":
            started = time.perf_counter()
    wall = time.perf_counter() - t0
    log = (cwd / "logs" / f"cryosiam_dask-{job_id}.out").read_text()
    if state != "COMPLETED":
        raise RuntimeError(f"job {job_id} {state}:\n{log[-3000:]}")
    # from the job's first log line to the workers having joined: start-up inside the allocation
    stamps = [time.strptime(t, "%H:%M:%S") for t in re.findall(r"^(\d\d:\d\d:\d\d) INFO", log, re.M)]
    joined = re.search(r"^(\d\d:\d\d:\d\d) INFO .*workers joined", log, re.M)
    startup = (time.mktime(time.strptime(joined.group(1), "%H:%M:%S")) - time.mktime(stamps[0])
               if joined and stamps else None)
    return {"wall_s": wall, "queued_s": (started or t0) - t0, "job_startup_s": startup, "job": job_id}


def run_cluster(config: Path) -> dict[str, Any]:
    cwd = config.parent
    scheduler_file = cwd / "cluster.json"
    t0 = time.perf_counter()
    with (cwd / "start_cluster.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "start_cluster.py"), "--jobs", "2", "--scheduler-file",
             str(scheduler_file), "--jobqueue", str(EXAMPLES / "jobqueue.yaml"), "--cores", "1", "--memory",
             "1GB", "--wait", "300"], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = proc.stdout.readline()
            if "2 worker(s)" not in line:
                raise RuntimeError(f"start_cluster.py: {line}")
            up = time.perf_counter() - t0
            run = cli(config, "--scheduler-file", str(scheduler_file))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    return {"wall_s": up + run, "cluster_up_s": up, "run_s": run}


RUNNERS = {"local": run_local, "runner": run_runner, "cluster": run_cluster}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--runs", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from cryosiam_dask.demo import write_demo_inputs

    args.out.mkdir(parents=True, exist_ok=True)
    base = write_demo_inputs(args.out / "demo", shape=tuple(args.shape), stem="TS_01")
    rows, reference = [], None
    for name in args.runs:
        config = config_for(base, name)
        row = {"run": name, **RUNNERS[name](config)}
        got = instances(config)
        reference = reference if reference is not None else got
        row["same_instances"] = sorted(got) == sorted(reference) and all(
            np.array_equal(got[k], reference[k]) for k in reference)
        rows.append(row)
    base_wall = rows[0]["wall_s"]
    for row in rows:
        row[f"x {rows[0]['run']}"] = row["wall_s"] / base_wall
        row["overhead_s"] = row["wall_s"] - base_wall
    columns = ["run", "wall_s", f"x {rows[0]['run']}", "overhead_s", "queued_s", "job_startup_s",
               "cluster_up_s", "run_s", "same_instances"]
    print(table(rows, columns))
    write_results(args.out, f"bench_slurm_{'x'.join(map(str, args.shape))}",
                  {"shape": args.shape, "runs": args.runs, "job_flags": JOB_FLAGS}, rows)
    return rows


if __name__ == "__main__":
    main()
