"""End to end on the GPU: ``instance_predict`` with ``device: cuda`` on dask-cuda's LocalCUDACluster.

``exact`` must give CryoSiam's maps (within 2e-5, as on CPU) and the same instances, ids included, as the
CPU run (which equals the golden output, tests/run/test_pipeline.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from cryosiam_dask.config import load_config
from cryosiam_dask.testing.strategies import assert_same_partition

pytestmark = pytest.mark.gpu


def _golden_config(golden: Path, tmp_path: Path, **ours) -> Path:
    """Copy the golden inputs next to a copy of its config whose prediction_folder is new."""
    for sub in ("data", "lamella", "model"):
        shutil.copytree(golden / sub, tmp_path / sub)
    cfg = yaml.safe_load((golden / "config_instance.yaml").read_text())
    cfg["prediction_folder"] = "out"
    cfg["cryosiam_dask"] = ours
    path = tmp_path / "config_instance.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][...]


@pytest.fixture(scope="module")
def cuda_client(cp, torch_cuda):
    """The cluster of ``device: cuda``: LocalCUDACluster, one worker on GPU 0, torch and cupy on RMM."""
    pytest.importorskip("dask_cuda")
    from cryosiam_dask.run.cluster import plan_cluster, start_client

    plan = plan_cluster(device="cuda", gpu_devices=1, dashboard_address=None)
    assert plan.kind == "cuda" and plan.gpus == (0,)
    with start_client(plan) as client:
        yield client


def test_cluster_is_one_cuda_worker(cuda_client):
    info = cuda_client.scheduler_info()["workers"]
    assert len(info) == 1
    assert cuda_client.run(lambda: __import__("torch").cuda.is_available()) == {w: True for w in info}


@pytest.mark.parametrize("chunks", [[16, 24, 20], [40, 61, 44]])
def test_exact_on_cuda_equals_cryosiam(golden, tmp_path, monkeypatch, cuda_client, chunks):
    from cryosiam_dask.run.driver import instance_predict

    cfg = _golden_config(golden, tmp_path, device="cuda", tiling="exact", chunk_size=chunks, halo=24,
                         output_formats=["cryosiam"])
    monkeypatch.chdir(tmp_path)
    results = instance_predict(load_config(cfg), client=cuda_client)
    out = tmp_path / "out"
    for name in ("foreground", "distances", "boundaries"):
        a = _read(out / "TS_tiny_preds.h5", name)
        b = _read(golden / "predictions" / "TS_tiny_preds.h5", name)
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.abs(a - b).max() <= 2e-5, name
    labels = _read(out / "TS_tiny_instance_preds.h5", "instances")
    expected = _read(golden / "predictions" / "TS_tiny_instance_preds.h5", "instances")
    assert labels.dtype == np.uint32
    assert_same_partition(labels, expected)
    np.testing.assert_array_equal(labels, expected)  # the ids too: identical to the CPU run
    assert results[0].n_instances == 10


def test_fast_bf16_on_cuda_finds_the_float32_instances(golden, tmp_path, monkeypatch, cuda_client):
    """``fast`` with bf16 autocast: not CryoSiam's maps, but the float32 ``fast`` run's instances (F1 >= 0.9
    at IoU 0.5, as on CPU in the README's figures); consecutive ids."""
    from benchmarks.bench_exact import f1_at
    from cryosiam_dask.run.driver import instance_predict

    labels = {}
    for amp in (None, "bf16"):
        folder = tmp_path / str(amp)
        folder.mkdir()
        cfg = _golden_config(golden, folder, device="cuda", tiling="fast", amp=amp, chunk_size=[40, 61, 44],
                             halo=24, output_formats=["cryosiam"])
        monkeypatch.chdir(folder)
        results = instance_predict(load_config(cfg), client=cuda_client)
        labels[amp] = _read(folder / "out" / "TS_tiny_instance_preds.h5", "instances")
        ids = np.unique(labels[amp][labels[amp] > 0])
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))
        assert results[0].n_instances == ids.size > 0
    assert f1_at(labels[None], labels["bf16"]) >= 0.9
