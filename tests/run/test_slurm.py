"""What each srun task of a --slurm-runner job is, from SLURM's variables (no SLURM needed here)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cryosiam_dask.errors import ConfigError
from cryosiam_dask.run.slurm import (
    default_scheduler_file,
    rank_of,
    tasks_on_node,
    worker_memory,
    worker_spec,
)

MIB = 1 << 20


def env(rank, *, ntasks=4, local=None, node=0, tasks="4", **extra):
    e = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_JOB_ID": "77",
         "SLURM_LOCALID": str(rank if local is None else local), "SLURM_NODEID": str(node),
         "SLURM_STEP_TASKS_PER_NODE": tasks}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def test_rank_0_is_the_scheduler_rank_1_the_client_the_others_cpu_workers():
    assert rank_of(env(0)).role == "scheduler"
    assert rank_of(env(1)).role == "client"
    w = rank_of(env(3, SLURM_CPUS_PER_TASK=4, SLURM_MEM_PER_CPU=2000))
    assert (w.role, w.gpu, w.threads, w.memory_limit, w.job_id) == ("worker", None, 4, 4 * 2000 * MIB, "77")
    assert rank_of(env(2, SLURM_CPUS_PER_TASK=4), threads_per_worker=2).threads == 2  # the config wins


def test_outside_srun_or_too_few_tasks_is_one_line():
    with pytest.raises(ConfigError, match="SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_ID not set; run .* srun"):
        rank_of({})
    with pytest.raises(ConfigError, match="has 2 task.*at least 3"):
        rank_of(env(1, ntasks=2))


def test_gpus_go_to_the_first_worker_ranks_of_each_node():
    # one node, 6 tasks, --gres=gpu:2: ranks 2 and 3 drive a GPU each, 4 and 5 are CPU workers
    one = {r: rank_of(env(r, ntasks=6, tasks="6", CUDA_VISIBLE_DEVICES="0,1")) for r in range(2, 6)}
    assert [one[r].gpu for r in range(2, 6)] == ["0", "1", None, None]
    assert one[2].threads == 1
    # two nodes of 3 tasks: node 0 holds the scheduler, the client and rank 2; node 1 ranks 3-5
    nodes = dict(ntasks=6, tasks="3(x2)", CUDA_VISIBLE_DEVICES="2,3")
    assert rank_of(env(2, local=2, node=0, **nodes)).gpu == "2"
    assert [rank_of(env(r, local=r - 3, node=1, **nodes)).gpu for r in (3, 4, 5)] == ["2", "3", None]
    # --device cpu: no CUDA worker, whatever SLURM gave
    assert rank_of(env(2, ntasks=6, tasks="6", CUDA_VISIBLE_DEVICES="0"), device="cpu").gpu is None
    assert rank_of(env(2, CUDA_VISIBLE_DEVICES="NoDevFiles")).gpu is None


def test_tasks_on_node_and_worker_memory():
    assert [tasks_on_node(env(0, node=n, tasks="3(x2),1")) for n in (0, 1, 2)] == [3, 3, 1]
    assert worker_memory(env(2, tasks="4", SLURM_MEM_PER_NODE=8000)) == 2000 * MIB  # --mem / node's tasks
    assert worker_memory(env(2, tasks="4", SLURM_MEM_PER_GPU=10000, CUDA_VISIBLE_DEVICES="0,1")) == 5000 * MIB
    assert worker_memory(env(2, SLURM_MEM_PER_CPU=1000, SLURM_CPUS_PER_TASK=3)) == 3000 * MIB
    assert worker_memory(env(2)) is None


def test_worker_spec_cpu_and_cuda():
    cpu = rank_of(env(2, SLURM_CPUS_PER_TASK=4, SLURM_MEM_PER_CPU=1000))
    cls, opts = worker_spec(cpu)
    assert cls == "distributed.Nanny"
    assert (opts["nthreads"], opts["resources"], opts["memory_limit"]) == (4, {"CPU": 4}, 4000 * MIB)
    assert worker_spec(cpu, memory_limit="8GB")[1]["memory_limit"] == "8GB"  # a set memory_limit wins
    assert worker_spec(cpu, memory_limit=None)[1]["memory_limit"] == 0  # None: no limit
    gpu = rank_of(env(2, CUDA_VISIBLE_DEVICES="1", SLURM_MEM_PER_GPU=4000, tasks="4"))
    cls, opts = worker_spec(gpu)
    assert cls == "dask_cuda.CUDAWorker"
    assert (opts["nthreads"], opts["resources"], opts["rmm_async"]) == (1, "GPU=1", True)


def test_default_scheduler_file_is_in_the_work_dir(tmp_path):
    assert default_scheduler_file(tmp_path, "12") == tmp_path / "scheduler-12.json"


def test_cli_slurm_runner_outside_srun_exits_2_with_one_line(tmp_path, monkeypatch):
    from cryosiam_dask.cli import app
    from cryosiam_dask.demo import write_demo_inputs

    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    config = write_demo_inputs(tmp_path, shape=(16, 32, 32))
    result = CliRunner().invoke(app, ["instance_predict", "--config_file", str(config), "--slurm-runner"])
    assert result.exit_code == 2
    assert "error: --slurm-runner: SLURM_PROCID" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "predictions").glob("*.h5"))  # nothing ran
