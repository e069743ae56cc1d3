"""Dask clusters: a CPU ``LocalCluster``, dask-cuda's ``LocalCUDACluster`` (one worker per GPU), or an
existing scheduler.

The choice is made here, not by dask-cuda: ``LocalCUDACluster`` raises at once on a machine without a GPU,
so it is only started when ``device`` resolves to ``cuda``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryosiam_dask.backend import GPU_HINT, require_gpu
from cryosiam_dask.errors import ClusterError, ConfigError, CryoSiamDaskError
from cryosiam_dask.run.failures import ALLOWED_FAILURES, one_line, watching
from cryosiam_dask.run.progress import Resources
from cryosiam_dask.run.workers import WORKER_WAIT_S, WorkerStderrToFile, check_workers

logger = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
"""Worker resource of the network's workers (one unit per GPU): the network tasks need one unit."""
CPU_RESOURCE = "CPU"
"""Worker resource of the host workers (one unit per thread): every other task needs one unit."""


def resources_of(workers: dict[str, Any]) -> Resources:
    """Which tasks need which worker resources, from what the cluster's workers advertise.

    Network tasks need ``GPU`` when a worker advertises it; every other task needs ``CPU`` when a worker
    advertises it (otherwise it may run anywhere). A cluster whose workers advertise neither (a plain
    ``LocalCluster``, most ``scheduler_address`` clusters) runs every task anywhere: a resource that no worker
    has would leave its tasks waiting forever.

    Parameters
    ----------
    workers : dict
        ``client.scheduler_info(n_workers=-1)["workers"]``.
    """
    seen: set[str] = set()
    for w in workers.values():
        seen |= {k for k, v in (w.get("resources") or {}).items() if v}
    return Resources(
        network={GPU_RESOURCE: 1} if GPU_RESOURCE in seen else None,
        host={CPU_RESOURCE: 1} if CPU_RESOURCE in seen else None,
    )


def add_workers(cluster: Any, prefix: str, n: int, *, threads: int, resources: dict[str, float],
                memory_limit: Any, processes: bool = True) -> list[str]:
    """Add `n` workers advertising `resources` to a running local cluster (``SpecCluster``); their names.

    Used for the CPU pool beside dask-cuda's GPU workers, so the same scheduler holds both.
    """
    from distributed import Nanny, Worker

    names = [f"{prefix}-{i}" for i in range(n)]
    for name in names:
        cluster.worker_spec[name] = {
            "cls": Nanny if processes else Worker,
            "options": {"nthreads": threads, "resources": resources, "memory_limit": memory_limit},
        }
    cluster.scale(len(cluster.worker_spec))
    return names


@dataclass(frozen=True)
class ClusterPlan:
    """How the cluster is (or would be) started.

    Attributes
    ----------
    kind : {"existing", "cpu", "cuda"}
        ``existing`` attaches to ``scheduler_address`` (or the scheduler of ``scheduler_file``) and starts
        nothing.
    n_workers, threads_per_worker : int
        Worker processes and threads per worker (``cpu``/``cuda``; 0 for ``existing``).
    memory_limit : str
        Per-worker memory limit passed to distributed (``"auto"`` = machine memory / n_workers).
    gpus : tuple of int
        GPU ids, one worker each (``cuda`` only).
    """

    kind: str
    n_workers: int
    threads_per_worker: int
    memory_limit: str
    gpus: tuple[int, ...] = ()
    cpu_workers: int = 0
    """``cuda``: host workers (``CPU`` resource) beside the GPU workers, for everything but the network."""
    cpu_threads: int = 0
    scheduler_address: str | None = None
    scheduler_file: Path | None = None
    dashboard_address: str | None = "127.0.0.1:8787"


def resolve_device(device: str) -> str:
    """Resolve ``"auto"`` to ``"cuda"`` when torch sees a GPU, else ``"cpu"``.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"cryosiam_dask.device: expected 'auto', 'cpu' or 'cuda', found {device!r}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_ids(gpu_devices: Any) -> tuple[int, ...]:
    """``parameters.gpu_devices``: a count (first N GPUs) or a list of ids; None means all visible GPUs."""
    import torch

    available = torch.cuda.device_count()
    if gpu_devices is None:
        return tuple(range(available))
    if isinstance(gpu_devices, int):
        if gpu_devices < 1:
            raise ConfigError(
                f"parameters.gpu_devices: expected a count >= 1 or a list of ids, found {gpu_devices}"
            )
        return tuple(range(min(gpu_devices, available)))
    ids = tuple(int(i) for i in gpu_devices)
    bad = [i for i in ids if i < 0 or i >= available]
    if bad:
        raise ConfigError(f"parameters.gpu_devices: GPU ids {bad} do not exist ({available} GPUs visible)")
    return ids


def plan_cluster(
    *,
    device: str = "cpu",
    scheduler_address: str | None = None,
    scheduler_file: Path | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = "auto",
    gpu_devices: Any = None,
    dashboard_address: str | None = "127.0.0.1:8787",
) -> ClusterPlan:
    """Decide the cluster without starting it.

    Parameters
    ----------
    device : {"cpu", "cuda"}
        Already resolved (see :func:`resolve_device`).
    scheduler_address : str or None, default None
        Attach to this scheduler (``tcp://host:8786``); nothing is started.
    scheduler_file : path or None, default None
        Attach to the scheduler whose address this JSON file holds (``dask scheduler --scheduler-file``,
        dask-jobqueue); nothing is started.
    n_workers : int or None, default None
        CPU: ``None`` = ``cores // threads_per_worker``. CUDA: one worker per GPU (``None``).
    threads_per_worker : int or None, default None
        CPU: ``None`` = 2 when the machine has >= 2 cores (torch runs 2 intra-op threads per worker, so the
        cores are used without oversubscription), else 1. CUDA: 1 (the GPU is the bottleneck).
    memory_limit : str or None, default "auto"
        Per worker; ``"auto"`` = total memory / n_workers.
    gpu_devices : int, list of int or None
        ``parameters.gpu_devices`` (CUDA only).
    dashboard_address : str or None, default "127.0.0.1:8787"
        Localhost only unless configured otherwise; ``None`` disables the dashboard.
    """
    memory_limit = memory_limit or "auto"
    if scheduler_address or scheduler_file:
        return ClusterPlan(
            "existing", 0, 0, memory_limit, scheduler_address=scheduler_address or None,
            scheduler_file=Path(scheduler_file) if scheduler_file else None, dashboard_address=None,
        )
    if device == "cuda":
        gpus = _gpu_ids(gpu_devices)
        if not gpus:
            raise ConfigError("cryosiam_dask.device is 'cuda' but torch sees no GPU")
        try:
            require_gpu()  # cupy and cuCIM on the client before any work: no silent CPU fallback
        except ImportError as e:
            raise ConfigError(f"cryosiam_dask.device: {e}") from None
        spare = max(1, (os.cpu_count() or 1) - len(gpus))  # one core per GPU worker feeds its GPU
        threads = min(2, spare)
        return ClusterPlan(
            "cuda",
            len(gpus),
            threads_per_worker or 1,
            memory_limit,
            gpus=gpus,
            cpu_workers=max(1, spare // threads),
            cpu_threads=threads,
            dashboard_address=dashboard_address,
        )
    cores = os.cpu_count() or 1
    threads = threads_per_worker or (2 if cores >= 2 else 1)
    workers = n_workers or max(1, cores // threads)
    return ClusterPlan("cpu", workers, threads, memory_limit, dashboard_address=dashboard_address)


def worker_environ() -> dict[str, Any]:
    """distributed's worker environment without ``MALLOC_TRIM_THRESHOLD_``.

    distributed sets ``MALLOC_TRIM_THRESHOLD_=65536`` in its workers; a fixed threshold switches off glibc's
    dynamic mmap threshold, so every large torch buffer is mmap'ed and page-faulted anew: CPU inference ran
    about 1.7x slower in a worker (measured, bench_inference). Memory stays bounded by the chunk size anyway.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


@contextlib.contextmanager
def start_client(
    plan: ClusterPlan,
    *,
    processes: bool = True,
    worker_log: Path | None = None,
    wait_s: float = WORKER_WAIT_S,
) -> Iterator[Any]:
    """Start (or attach to) the cluster of ``plan`` and yield a ``distributed.Client``.

    The dashboard link is logged at start. On exit, a cluster started here is closed; an existing one is left
    running. Every failure to start is one :class:`~cryosiam_dask.errors.ClusterError` line in bounded time:
    a scheduler that cannot be reached, workers that do not start or join within ``wait_s``, a worker that
    cannot import the task modules (:func:`~cryosiam_dask.run.workers.check_workers`). A cluster started here
    retries a task whose worker died :data:`~cryosiam_dask.run.failures.ALLOWED_FAILURES` time(s), and its
    workers write their stderr to ``worker_log`` (when given).
    """
    import dask
    from distributed import Client

    if plan.kind == "existing":
        client = _attach(plan)
        with client:
            where = f"the scheduler {client.scheduler.address}"
            check_workers(client, n_workers=1, timeout=wait_s, where=where)
            logger.info(
                "attached to existing scheduler %s (%d workers)",
                client.scheduler.address,
                len(client.scheduler_info().get("workers", {})),
            )
            yield client
        return
    where = f"the local {plan.kind} cluster"
    # the scheduler of a local cluster lives in this process and reads allowed-failures when it is created
    options = {
        "distributed.nanny.pre-spawn-environ": worker_environ(),
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
    }
    with watching(worker_log, plan.memory_limit) as ctx, contextlib.ExitStack() as stack:
        with dask.config.set(options):
            try:
                cluster = _local_cluster(plan, processes)
            except (ImportError, CryoSiamDaskError):
                raise
            except Exception as e:  # "Nanny failed to start.", a timeout, a port in use ...
                cause = ctx.deaths.causes[-1] if ctx.deaths.causes else one_line(str(e)) or type(e).__name__
                raise ClusterError(
                    f"the dask workers of {where} could not start ({cause}); a worker process that fails "
                    "on import (a broken torch, cupy or cryosiam_dask install) prints why on stderr"
                ) from None
        stack.enter_context(cluster)
        client = stack.enter_context(Client(cluster))
        if worker_log is not None and processes:
            try:
                client.register_plugin(WorkerStderrToFile(worker_log))
            except Exception as e:
                logger.warning("the workers' stderr stays on the terminal (%s)", one_line(str(e)))
        n_all = max(1, plan.n_workers + plan.cpu_workers)
        check_workers(client, n_workers=n_all, timeout=wait_s, where=where)
        logger.info(
            "started %s cluster: %d workers x %d threads%s; dashboard: %s",
            plan.kind,
            plan.n_workers,
            plan.threads_per_worker,
            f" + {plan.cpu_workers} CPU workers x {plan.cpu_threads} threads" * bool(plan.cpu_workers),
            client.dashboard_link if plan.dashboard_address else "off",
        )
        yield client


def _attach(plan: ClusterPlan) -> Any:
    """A ``Client`` of the existing scheduler of ``plan`` (its address, or its scheduler file)."""
    import dask
    from distributed import Client

    key, address = "cryosiam_dask.scheduler_address", plan.scheduler_address
    if plan.scheduler_file is not None:
        key, address = "cryosiam_dask.scheduler_file", read_scheduler_file(plan.scheduler_file)
    try:
        return Client(address, timeout=dask.config.get("distributed.comm.timeouts.connect"))
    except OSError as e:  # includes distributed's TimeoutError for an address nobody listens on
        cause = one_line(str(e)) or type(e).__name__
        raise ClusterError(f"{key}: cannot connect to the dask scheduler at {address} ({cause})") from None


def read_scheduler_file(path: Path) -> str:
    """The scheduler address in a scheduler file (``{"address": "tcp://..."}``), read once.

    distributed's own reader waits forever for a missing file; a run should say at once what is wrong.

    Raises
    ------
    ClusterError
        The file is missing, not JSON, or has no ``address``.
    """
    import json

    key = "cryosiam_dask.scheduler_file"
    try:
        address = json.loads(Path(path).read_text()).get("address")
    except FileNotFoundError:
        raise ClusterError(f"{key}: {path} does not exist (is the scheduler running?)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise ClusterError(f"{key}: {path} is not a dask scheduler file ({one_line(str(e))})") from None
    if not isinstance(address, str) or not address:
        raise ClusterError(f"{key}: {path} is not a dask scheduler file (no 'address')")
    return address


def _local_cluster(plan: ClusterPlan, processes: bool) -> Any:
    """A ``LocalCUDACluster`` (one worker per GPU) or a CPU ``LocalCluster`` of ``plan``."""
    from distributed import LocalCluster

    if plan.kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            raise ImportError(GPU_HINT) from e
        cluster = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=list(plan.gpus),
            threads_per_worker=plan.threads_per_worker,
            resources={GPU_RESOURCE: 1},
            memory_limit=plan.memory_limit,
            # one allocator for torch and cupy: RMM on CUDA's stream-ordered pool (cudaMallocAsync), which
            # reuses freed blocks; without a pool or async RMM every allocation is a cudaMalloc/cudaFree
            rmm_async=True,
            rmm_allocator_external_lib_list=["cupy", "torch"],
            dashboard_address=plan.dashboard_address,
        )
        # the host pool: watershed, multicut and outputs on the remaining cores while the GPUs run the network
        add_workers(cluster, "cpu", plan.cpu_workers, threads=plan.cpu_threads,
                    resources={CPU_RESOURCE: plan.cpu_threads}, memory_limit=plan.memory_limit)
        return cluster
    return LocalCluster(
        n_workers=plan.n_workers,
        threads_per_worker=plan.threads_per_worker,
        memory_limit=plan.memory_limit,
        processes=processes,
        dashboard_address=plan.dashboard_address,
    )
