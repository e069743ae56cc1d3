"""Start a dask cluster of SLURM worker jobs (dask-jobqueue's SLURMCluster) and write its scheduler file.

Run it on a login node (in tmux/screen: the scheduler lives in this process) or do the same in a notebook:

    python start_cluster.py --jobs 4 --scheduler-file cluster.json --jobqueue jobqueue.yaml
    cryosiam_dask instance_predict --config_file config_instance.yaml --scheduler-file cluster.json

It submits the worker jobs, waits until they have joined, prints the scheduler address, and keeps the cluster
until Ctrl-C or SIGTERM, then cancels the jobs. Settings come from the jobqueue YAML (jobqueue.yaml: CPU
workers, jobqueue-gpu.yaml: one GPU per job), or from ~/.config/dask/jobqueue.yaml without --jobqueue; the
flags below override it. Needs dask-jobqueue: pip install "cryosiam_dask[slurm]".
"""

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import dask
import yaml


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1, help="worker jobs to submit (default 1)")
    p.add_argument("--scheduler-file", type=Path, required=True, help="where the scheduler's address goes")
    p.add_argument("--jobqueue", type=Path, help="a jobqueue YAML (default: dask's config, ~/.config/dask)")
    p.add_argument("--cores", type=int, help="override: CPUs per job")
    p.add_argument("--memory", help="override: memory per job ('32GB')")
    p.add_argument("--walltime", help="override: walltime per job ('04:00:00')")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for the jobs (default 600)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.jobqueue is not None:
        dask.config.update(dask.config.config, yaml.safe_load(args.jobqueue.read_text()), priority="new")

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    given = {"cores": args.cores, "memory": args.memory, "walltime": args.walltime}
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.cores is not None:  # keep the CPU resource equal to the threads
        extra = list(dask.config.get("jobqueue.slurm.worker-extra-args") or [])
        if "--resources" in extra and extra[extra.index("--resources") + 1].startswith("CPU="):
            extra[extra.index("--resources") + 1] = f"CPU={args.cores}"
        overrides["worker_extra_args"] = extra
    scheduler_options = dict(dask.config.get("jobqueue.slurm.scheduler-options") or {})
    # the scheduler writes its address there at start; the file is removed when the cluster closes
    scheduler_options["scheduler_file"] = str(args.scheduler_file.resolve())
    # Ctrl-C or SIGTERM (scancel, kill) at any point: leave the with-blocks, which cancel the worker jobs
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        cluster = SLURMCluster(scheduler_options=scheduler_options, **overrides)
        with cluster, Client(cluster) as client:
            logging.info("worker job script:\n%s", cluster.job_script())
            cluster.scale(jobs=args.jobs)
            try:  # at least one worker per job (a queue may hold jobs for long: the cluster is kept anyway)
                client.wait_for_workers(args.jobs, timeout=args.wait)
            except TimeoutError:
                logging.warning("not every job started in %.0f s; they join when SLURM runs them", args.wait)
            n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
            print(f"scheduler {cluster.scheduler_address}: {n_workers} worker(s) of {args.jobs} SLURM job(s) "
                  f"joined; scheduler file {args.scheduler_file}", flush=True)
            while True:
                time.sleep(3600)
    except Stop:
        logging.info("stopped; the worker jobs are cancelled")
    finally:
        args.scheduler_file.unlink(missing_ok=True)
    return 0


class Stop(Exception):
    """Raised by a signal in the main thread."""


def _stop(*_):
    raise Stop()


if __name__ == "__main__":
    sys.exit(main())
