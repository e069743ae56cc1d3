"""The pipeline users run (issue 20): every task once through ``instance_predict``, tomograms streamed, GPU
and CPU work apart, the memory watchdog."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import yaml

from cryosiam_dask.config import load_config
from cryosiam_dask.demo import DEMO_STEM, write_demo_inputs
from cryosiam_dask.errors import ClusterError
from cryosiam_dask.run.driver import instance_predict

SHAPE = (32, 64, 64)


def _config(tmp: Path, **ours) -> Path:
    """The demo case (tiny engineered checkpoint, patch 32) without its mask, so every patch is evaluated."""
    path = write_demo_inputs(tmp, shape=SHAPE)
    cfg = yaml.safe_load(path.read_text())
    cfg["mask_folder"] = ""
    cfg["cryosiam_dask"] = {"halo": 16, "output_formats": ["cryosiam"], **ours}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _labels(folder: Path, stem: str = DEMO_STEM) -> np.ndarray:
    with h5py.File(folder / f"{stem}_instance_preds.h5", "r") as f:
        return f["instances"][...]


def _executions(stream: list[dict]) -> dict[str, int]:
    """Task executions per kind (the key's prefix: network, windows, labels ...) in a task stream."""
    counts: dict[str, int] = {}
    for record in stream:
        kind = str(record["key"]).split("-")[0].strip("('\"")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _count_patches(monkeypatch) -> list[int]:
    """Counts every window the network evaluates (the batches pass through ``run_network_batches``)."""
    from cryosiam_dask.network import predict

    seen = [0]
    lock = threading.Lock()
    real = predict.run_network_batches

    def counting(model, inputs, **kw):
        def counted():
            for batch in inputs:
                with lock:
                    seen[0] += len(batch)
                yield batch

        return real(model, counted(), **kw)

    monkeypatch.setattr(predict, "run_network_batches", counting)
    return seen


@pytest.mark.parametrize("tiling", ["exact", "fast"])
def test_each_patch_window_and_chunk_once_through_instance_predict(tmp_path, monkeypatch, client, tiling):
    """Network calls == distinct patches (exact) / windows (fast), instance windows and label chunks once
    each, the same instances, at one chunk, on-grid chunks and chunks that straddle the inference blocks."""
    from distributed import get_task_stream

    from cryosiam_dask.network import tiling as tl
    from cryosiam_dask.network.predict import plan_inference

    patches = _count_patches(monkeypatch)
    found = []
    for chunks in ([32, 64, 64], [16, 32, 32], [12, 20, 24]):
        folder = tmp_path / "x".join(map(str, chunks))
        cfg = _config(folder, chunk_size=chunks, tiling=tiling)
        patches[0] = 0
        with get_task_stream(client) as stream:
            [result] = instance_predict(load_config(cfg), client=client)
        runs = _executions(stream.data)
        n_chunks = int(np.prod([-(-s // c) for s, c in zip(SHAPE, chunks, strict=True)]))
        if tiling == "exact":
            _, distinct = tl.exact_patch_evaluations(SHAPE, da.zeros(SHAPE, chunks=chunks).chunks, (32,) * 3)
            expected = distinct
        else:
            tomogram = da.zeros(SHAPE, np.float32, chunks=chunks)
            plan = plan_inference(tomogram, load_config(cfg).checkpoint_path, tiling="fast")
            expected = sum(int(np.prod([len(ax[2]) for ax in b.plan])) for b in plan.blocks)
        assert patches[0] == expected, (chunks, patches[0], expected)
        assert runs["network"] == result.report["maps_blocks_computed"] == result.report["maps_blocks"]
        assert runs["windows"] == n_chunks  # one instance window per storage chunk, once
        assert runs["labels"] == n_chunks  # each label chunk computed and written once
        found.append(_labels(folder / "predictions"))
    for other in found[1:]:
        np.testing.assert_array_equal(other, found[0])
    assert found[0].max() > 0


def test_tomograms_stream_through_their_chains(tmp_path, client, caplog):
    """3 tomograms, 2 in flight: the first outputs are written before the third tomogram's maps start, and
    each tomogram's end is logged with its count and position."""
    import logging

    cfg_path = _config(tmp_path, tomograms_in_flight=2, chunk_size=[16, 32, 32])
    cfg = yaml.safe_load(cfg_path.read_text())
    src = tmp_path / "data" / f"{DEMO_STEM}.mrc"
    for i in (1, 2):
        (tmp_path / "data" / f"TS_{i:02d}.mrc").write_bytes(src.read_bytes())
    cfg["test_files"] = None
    cfg_path.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.INFO, logger="cryosiam_dask"):
        results = instance_predict(load_config(cfg_path), client=client)
    assert [r.stem for r in results] == ["TS_01", "TS_02", DEMO_STEM]
    out = tmp_path / "predictions"
    first_output = min((out / f"{r.stem}_instance_preds.h5").stat().st_mtime for r in results)
    third_maps = min(p.stat().st_mtime for p in (out / ".cryosiam_dask" / DEMO_STEM).glob("maps-*.zarr"))
    assert first_output <= third_maps
    done = [m for m in caplog.messages if " done: " in m and " instances (" in m]
    assert [m.split("(")[-1] for m in done] == ["1 of 3)", "2 of 3)", "3 of 3)"], done
    labels = [_labels(out, r.stem) for r in results]
    assert all(np.array_equal(lab, labels[0]) for lab in labels)  # the same tomogram three times
    assert any("work dir peak" in m for m in caplog.messages)


def test_gpu_workers_get_every_network_task_and_no_watershed(tmp_path):
    """A cluster whose workers advertise ``GPU`` and ``CPU``: network tasks only on the first, instance
    windows and label writes only on the second (the layout a CUDA node gets, tested on CPU)."""
    from distributed import Client, LocalCluster, get_task_stream

    from cryosiam_dask.run.cluster import add_workers

    cfg = _config(tmp_path, chunk_size=[16, 32, 32])
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        add_workers(cluster, "gpu", 1, threads=1, resources={"GPU": 1}, memory_limit=0, processes=False)
        add_workers(cluster, "cpu", 1, threads=2, resources={"CPU": 2}, memory_limit=0, processes=False)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            with get_task_stream(client) as stream:
                [result] = instance_predict(load_config(cfg), client=client)
    ran: dict[str, set[str]] = {}
    for record in stream.data:
        kind = str(record["key"]).split("-")[0].strip("('\"")
        ran.setdefault(kind, set()).add(names[record["worker"]])
    assert ran["network"] == {"gpu-0"}
    assert ran["windows"] == {"cpu-0"} and ran["labels"] == {"cpu-0"}
    assert result.n_instances > 0


def test_paused_workers_stop_the_run_with_one_line_naming_memory():
    from cryosiam_dask.run.monitor import PausedWatchdog

    stopped: list[Exception] = []
    info = {"a": {"status": "paused", "memory_limit": 900 * 2**20}, "b": {"status": "running"}}
    dog = PausedWatchdog(lambda: info, timeout=0.2, stop=stopped.append, interval=0.05)
    with dog:
        time.sleep(0.5)
        assert not stopped  # one worker still runs: memory can be freed
        info["b"]["status"] = "paused"
        time.sleep(0.6)
    [error] = stopped
    assert isinstance(error, ClusterError)
    assert "paused for 0 s: out of memory" in str(error) and "900.00 MiB" in str(error)
    assert "\n" not in str(error)
