"""A whole run inside one SLURM allocation: dask-jobqueue's ``SLURMRunner`` (``--slurm-runner``).

Every task of one ``srun`` runs the same ``cryosiam_dask instance_predict ... --slurm-runner`` command;
``SLURMRunner`` gives each its part by ``SLURM_PROCID``: rank 0 runs the dask scheduler (which writes the
scheduler file), rank 1 the client (validation, locks, the run itself), every other rank a dask worker.
Nothing runs on the login node. This module decides what each worker rank is, from the variables SLURM sets:

- a worker rank takes one of its node's GPUs (``CUDA_VISIBLE_DEVICES``, set by ``--gres=gpu:N`` /
  ``--gpus-per-node``) while the node has one left: dask-cuda's ``CUDAWorker``, one thread, resource ``GPU=1``
  (the network tasks need it), torch and cupy on one RMM pool, as on one local GPU node;
- every other worker rank is a CPU worker (a ``Nanny``) with ``--cpus-per-task`` threads advertising
  ``CPU=<threads>`` (every other task needs one unit).

GPUs are handed out in ``SLURM_LOCALID`` order among a node's worker ranks, which assumes srun's default
block distribution (ranks 0 and 1 on the first node). Worker memory comes from the allocation
(``--mem-per-cpu``, ``--mem``, ``--mem-per-gpu``) unless ``memory_limit`` is set. Spill files go to dask's
``temporary-directory`` (``DASK_TEMPORARY_DIRECTORY``: node-local scratch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryosiam_dask.errors import ConfigError

logger = logging.getLogger(__name__)

SLURM_HINT = 'the SLURM runner needs dask-jobqueue: pip install "cryosiam_dask[slurm]"'
NEEDED = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")
DEATH_TIMEOUT_S = 120
"""A worker whose scheduler is gone (rank 0 killed) exits after this many seconds."""


@dataclass(frozen=True)
class Rank:
    """What one task of the ``srun`` step does.

    Attributes
    ----------
    role : {"scheduler", "client", "worker"}
        Rank 0, rank 1, every other rank (dask-jobqueue's ``SLURMRunner`` order).
    rank, n_tasks : int
        ``SLURM_PROCID`` and ``SLURM_NTASKS``.
    job_id : str
        ``SLURM_JOB_ID``.
    gpu : str or None
        Worker ranks: the GPU (a ``CUDA_VISIBLE_DEVICES`` entry) this rank drives; None = a CPU worker.
    threads : int
        Worker ranks: threads (``SLURM_CPUS_PER_TASK``, 1 when unset; 1 for a GPU worker).
    memory_limit : int or None
        Worker ranks: bytes of the allocation for this rank; None when SLURM gives no memory figure.
    """

    role: str
    rank: int
    n_tasks: int
    job_id: str
    gpu: str | None = None
    threads: int = 1
    memory_limit: int | None = None


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    value = env.get(key, "")
    match = re.match(r"\d+", value)  # SLURM_CPUS_PER_TASK may read "2" or, on some sites, "2(x3)"
    return int(match.group()) if match else default


def tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node: ``SLURM_STEP_TASKS_PER_NODE`` (``"3(x2),1"``) at ``SLURM_NODEID``."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(env, "SLURM_NODEID", 0) or 0
    return counts[node] if node < len(counts) else max(1, _int(env, "SLURM_NTASKS", 1) or 1)


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs SLURM gave this task (``CUDA_VISIBLE_DEVICES``); empty without ``--gres=gpu``."""
    value = env.get("CUDA_VISIBLE_DEVICES", "")
    return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "NoDevFiles"]


def worker_memory(env: Mapping[str, str]) -> int | None:
    """Bytes of the allocation for one task: ``--mem-per-cpu`` x ``--cpus-per-task``, else the node's memory
    (``--mem``, or ``--mem-per-gpu`` x the node's GPUs) shared by the step's tasks on the node; None if
    SLURM gives no figure."""
    mib = 1 << 20
    per_cpu = _int(env, "SLURM_MEM_PER_CPU")
    if per_cpu:
        return per_cpu * mib * max(1, _int(env, "SLURM_CPUS_PER_TASK", 1) or 1)
    node = _int(env, "SLURM_MEM_PER_NODE")
    if not node and _int(env, "SLURM_MEM_PER_GPU"):
        node = (_int(env, "SLURM_MEM_PER_GPU") or 0) * max(1, len(visible_gpus(env)))
    return node * mib // tasks_on_node(env) if node else None


def rank_of(env: Mapping[str, str], *, device: str = "auto", threads_per_worker: int | None = None) -> Rank:
    """What this task of the step is (see the module's docstring).

    Parameters
    ----------
    env : mapping
        ``os.environ`` of an ``srun`` task.
    device : {"auto", "cpu", "cuda"}, default "auto"
        ``cpu``: never a GPU worker, whatever SLURM gave.
    threads_per_worker : int or None, default None
        CPU workers' threads; None = ``SLURM_CPUS_PER_TASK``.

    Raises
    ------
    ConfigError
        Not inside ``srun`` (no ``SLURM_PROCID``), or fewer than 3 tasks (scheduler, client, a worker).
    """
    missing = [k for k in NEEDED if not env.get(k)]
    if missing:
        raise ConfigError(
            f"--slurm-runner: {', '.join(missing)} not set; run the command with srun inside an sbatch job "
            "(examples/slurm/cryosiam_dask.sbatch)"
        )
    rank, n_tasks = _int(env, "SLURM_PROCID", 0) or 0, _int(env, "SLURM_NTASKS", 0) or 0
    if n_tasks < 3:
        raise ConfigError(
            f"--slurm-runner: the step has {n_tasks} task(s); it needs at least 3 (scheduler, client, one "
            "worker): #SBATCH --ntasks=<2 + workers>"
        )
    job_id = env["SLURM_JOB_ID"]
    if rank < 2:
        return Rank("scheduler" if rank == 0 else "client", rank, n_tasks, job_id)
    local = _int(env, "SLURM_LOCALID", 0) or 0
    # block distribution: this node's first rank is rank - local; ranks 0 and 1 among them are not workers
    worker_index = local - max(0, 2 - (rank - local))
    gpus = visible_gpus(env) if device != "cpu" else []
    if 0 <= worker_index < len(gpus):
        return Rank("worker", rank, n_tasks, job_id, gpu=gpus[worker_index], memory_limit=worker_memory(env))
    threads = threads_per_worker or max(1, _int(env, "SLURM_CPUS_PER_TASK", 1) or 1)
    return Rank("worker", rank, n_tasks, job_id, threads=threads, memory_limit=worker_memory(env))


def default_scheduler_file(work_dir: Path, job_id: str) -> Path:
    """``<work_dir>/scheduler-<job id>.json``: on the shared file system every rank already needs."""
    return Path(work_dir) / f"scheduler-{job_id}.json"


def _memory(rank: Rank, configured: Any) -> Any:
    """The worker's memory_limit: the config's, unless it is 'auto' and SLURM gave a figure."""
    if configured in (None, 0):
        return 0  # no limit
    if configured == "auto" and rank.memory_limit:
        return rank.memory_limit
    return configured


def worker_spec(rank: Rank, *, memory_limit: Any = "auto") -> tuple[str, dict[str, Any]]:
    """``SLURMRunner``'s ``worker_class`` and ``worker_options`` for a worker rank."""
    from cryosiam_dask.run.cluster import CPU_RESOURCE, GPU_RESOURCE

    memory = _memory(rank, memory_limit)
    if rank.gpu is not None:
        return "dask_cuda.CUDAWorker", {
            "nthreads": 1,
            "resources": f"{GPU_RESOURCE}=1",  # CUDAWorker parses a "NAME=n" string
            "memory_limit": memory,
            # as LocalCUDACluster in run.cluster: one stream-ordered pool for torch and cupy
            "rmm_async": True,
            "rmm_allocator_external_lib_list": ["cupy", "torch"],
            "death_timeout": DEATH_TIMEOUT_S,
            "dashboard_address": ":0",
        }
    return "distributed.Nanny", {
        "nthreads": rank.threads,
        "resources": {CPU_RESOURCE: rank.threads},
        "memory_limit": memory,
        "death_timeout": DEATH_TIMEOUT_S,
        "dashboard_address": ":0",
    }


@contextlib.contextmanager
def runner_client(config: Any, *, env: Mapping[str, str] | None = None,
                  wait_s: float | None = None) -> Iterator[Any]:
    """Start this rank's part of a ``SLURMRunner`` cluster; on rank 1 yield a ``distributed.Client``.

    Ranks 0 (scheduler) and 2+ (workers) run until the client closes the cluster, then exit the process
    (dask-jobqueue ends them with ``SystemExit``, code 0): only rank 1 ever enters the ``with`` body. On
    leaving it, the scheduler and the workers are closed and the scheduler file removed.

    Parameters
    ----------
    config : InstanceConfig
        Its ``cryosiam_dask`` section gives ``device``, ``threads_per_worker``, ``memory_limit``,
        ``dashboard_address`` and ``scheduler_file`` (default :func:`default_scheduler_file`).
    env : mapping, optional
        The SLURM variables; default ``os.environ``.
    wait_s : float, optional
        How long the client waits for every worker to join; default
        :data:`~cryosiam_dask.run.workers.WORKER_WAIT_S`.

    Raises
    ------
    ConfigError
        Not inside ``srun``, too few tasks (:func:`rank_of`), or dask-jobqueue missing.
    ClusterError
        The workers did not join within ``wait_s`` or cannot import the task modules.
    """
    import dask

    from cryosiam_dask.run.cluster import worker_environ
    from cryosiam_dask.run.failures import ALLOWED_FAILURES
    from cryosiam_dask.run.workers import WORKER_WAIT_S, check_workers

    env = os.environ if env is None else env
    s = config.cryosiam_dask
    rank = rank_of(env, device=s.device, threads_per_worker=s.threads_per_worker)
    try:
        from dask_jobqueue.slurm import SLURMRunner
    except ImportError as e:
        raise ConfigError(f"--slurm-runner: {SLURM_HINT}") from e
    scheduler_file = Path(s.scheduler_file or default_scheduler_file(config.work_dir, rank.job_id))
    scheduler_file = Path(str(scheduler_file).replace("{job_id}", rank.job_id))
    options: dict[str, Any] = {"scheduler_file": str(scheduler_file)}
    if rank.role == "scheduler":
        scheduler_file.parent.mkdir(parents=True, exist_ok=True)
        options["scheduler_options"] = {"dashboard_address": s.dashboard_address or ":0",
                                        "dashboard": s.dashboard_address is not None}
    if rank.role == "worker":
        if rank.gpu is not None:  # CUDAWorker starts one worker per visible GPU: this rank's one
            os.environ["CUDA_VISIBLE_DEVICES"] = rank.gpu
        options["worker_class"], options["worker_options"] = worker_spec(rank, memory_limit=s.memory_limit)
    logger.info("slurm job %s, rank %d of %d: %s", rank.job_id, rank.rank, rank.n_tasks, describe(rank))
    config_values = {
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,  # read by the scheduler at its start
        "distributed.nanny.pre-spawn-environ": worker_environ(),  # CPU workers: no fixed malloc trim
    }
    with dask.config.set(config_values), SLURMRunner(**options) as runner:
        # only the client rank gets here; the scheduler and worker ranks exited inside SLURMRunner
        from distributed import Client

        try:
            with Client(runner.scheduler_address) as client:
                n_workers = rank.n_tasks - 2
                check_workers(client, n_workers=n_workers, timeout=wait_s or WORKER_WAIT_S,
                              where=f"SLURM job {rank.job_id}")
                logger.info("slurm job %s: %d workers joined the scheduler %s", rank.job_id, n_workers,
                            runner.scheduler_address)
                yield client
        finally:
            scheduler_file.unlink(missing_ok=True)


def describe(rank: Rank) -> str:
    """One phrase for the log: what this rank runs."""
    if rank.role != "worker":
        return f"the dask {rank.role}"
    memory = f"{rank.memory_limit / 2**30:.1f} GiB" if rank.memory_limit else "memory not set by SLURM"
    if rank.gpu is not None:
        return f"a CUDA worker on GPU {rank.gpu}, {memory}"
    return f"a CPU worker, {rank.threads} thread(s), {memory}"
