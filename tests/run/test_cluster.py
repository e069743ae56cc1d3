"""Cluster choice, attaching to an existing scheduler, and several tomograms scheduled together."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from cryosiam_dask.config import load_config
from cryosiam_dask.errors import ConfigError
from cryosiam_dask.run.cluster import plan_cluster, resolve_device


def test_cpu_plan_uses_the_cores_without_oversubscription():
    plan = plan_cluster(device="cpu")
    assert plan.kind == "cpu"
    assert plan.n_workers * plan.threads_per_worker <= max(2, os.cpu_count() or 1)
    assert plan.dashboard_address.startswith("127.0.0.1")  # localhost unless configured otherwise


def test_explicit_sizes_and_existing_scheduler():
    plan = plan_cluster(device="cpu", n_workers=3, threads_per_worker=1, memory_limit="2GB")
    assert (plan.n_workers, plan.threads_per_worker, plan.memory_limit) == (3, 1, "2GB")
    plan = plan_cluster(device="cpu", scheduler_address="tcp://10.0.0.1:8786", n_workers=3)
    assert plan.kind == "existing" and plan.scheduler_address == "tcp://10.0.0.1:8786"


def test_device_names_are_checked():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="cryosiam_dask.device"):
        resolve_device("gpu0")


def test_cuda_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        plan_cluster(device="cuda")


def test_cuda_without_the_gpu_extra_is_a_clear_error(monkeypatch):
    """A GPU but no cupy/cuCIM: one line naming the extra, before any work (no silent CPU fallback)."""
    import importlib.util

    from cryosiam_dask.run import cluster

    if importlib.util.find_spec("cupy") and importlib.util.find_spec("cucim"):
        pytest.skip("the gpu extra is installed")
    monkeypatch.setattr(cluster, "_gpu_ids", lambda gpu_devices: (0,))
    one_line = r'^cryosiam_dask.device: device .cuda. needs .*"cryosiam_dask\[gpu\]"$'
    with pytest.raises(ConfigError, match=one_line):
        plan_cluster(device="cuda")


@pytest.fixture
def two_tomograms(tmp_path):
    from cryosiam_dask.demo import DEMO_STEM, write_demo_inputs

    cfg_path = write_demo_inputs(tmp_path, shape=(32, 64, 64), seed=3)
    shutil.copy(tmp_path / "data" / f"{DEMO_STEM}.mrc", tmp_path / "data" / "TS_copy.mrc")
    shutil.copy(tmp_path / "lamella" / f"{DEMO_STEM}_preds.h5", tmp_path / "lamella" / "TS_copy_preds.h5")
    return cfg_path


@pytest.mark.slow
def test_attach_to_existing_scheduler_and_schedule_two_tomograms_together(two_tomograms, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    from cryosiam_dask.run.driver import instance_predict

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        cfg = load_config(
            two_tomograms,
            {
                "scheduler_address": cluster.scheduler_address,
                "chunk_size": (16, 32, 32),
                "output_formats": ["cryosiam"],
            },
        )
        with Client(cluster) as observer, get_task_stream(observer) as ts:
            results = instance_predict(cfg)
        stream = ts.data
        assert len(cluster.workers) == 2  # the run started nothing of its own and left the cluster up
    assert [r.stem for r in results] == ["TS_copy", "TS_demo"]
    a = h5py.File(tmp_path / "predictions" / "TS_copy_instance_preds.h5")["instances"][...]
    b = h5py.File(tmp_path / "predictions" / "TS_demo_instance_preds.h5")["instances"][...]
    assert np.array_equal(a, b) and a.max() > 0
    workers = {t["worker"] for t in stream}
    assert len(workers) == 2  # both workers got work


def test_scheduler_file_plan_and_unreadable_files_are_one_line(tmp_path):
    from cryosiam_dask.errors import ClusterError
    from cryosiam_dask.run.cluster import read_scheduler_file

    plan = plan_cluster(device="cpu", scheduler_file=tmp_path / "s.json")
    assert plan.kind == "existing" and plan.scheduler_file == tmp_path / "s.json"
    with pytest.raises(ClusterError, match=r"scheduler_file: .*s.json does not exist \(is the scheduler"):
        read_scheduler_file(tmp_path / "s.json")
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ClusterError, match="is not a dask scheduler file"):
        read_scheduler_file(tmp_path / "s.json")
    (tmp_path / "s.json").write_text('{"id": "Scheduler-1"}')
    with pytest.raises(ClusterError, match="no 'address'"):
        read_scheduler_file(tmp_path / "s.json")


def test_scheduler_address_and_file_together_are_refused(two_tomograms, tmp_path):
    with pytest.raises(ConfigError, match="set 'scheduler_address' or 'scheduler_file', not both"):
        load_config(two_tomograms, {"scheduler_address": "tcp://h:1", "scheduler_file": tmp_path / "s.json"})


@pytest.mark.slow
def test_attach_through_a_scheduler_file(two_tomograms, tmp_path):
    from distributed import LocalCluster

    from cryosiam_dask.run.driver import instance_predict

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"scheduler_file": str(tmp_path / "scheduler.json")}) as cluster:
        assert (tmp_path / "scheduler.json").is_file()  # written by the scheduler, as dask-jobqueue's is
        cfg = load_config(two_tomograms, {"scheduler_file": tmp_path / "scheduler.json",
                                          "output_formats": ["cryosiam"]})
        results = instance_predict(cfg)
        assert len(cluster.workers) == 2  # left running
    assert [r.stem for r in results] == ["TS_copy", "TS_demo"] and results[0].n_instances > 0
