"""The device code paths that CPUs can run (no marker: part of the normal suite).

The CUDA-only knobs of :mod:`cryosiam_dask.network.runtime` are set through small functions, checked here
on a stand-in namespace; the CPU path must not touch them; the pipelined batch loop and the device
benchmark's dry run work on CPU.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import dask
import dask.array as da
import numpy as np
import pytest

from cryosiam_dask.network import predict, runtime


def _backends() -> SimpleNamespace:
    return SimpleNamespace(
        cudnn=SimpleNamespace(benchmark=False, allow_tf32=True),
        cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=True)),
    )


def test_cuda_flags_exact_and_fast():
    assert runtime.cuda_flags(tf32=False) == {
        "cudnn.benchmark": True, "cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False}
    assert runtime.cuda_flags(tf32=True) == {"cudnn.benchmark": True, "cudnn.allow_tf32": True}
    assert runtime.cuda_flags(tf32=True, benchmark=False)["cudnn.benchmark"] is False


@pytest.mark.parametrize("tf32", [False, True])
def test_configure_cuda_sets_what_it_returns(tf32):
    b = _backends()
    applied = runtime.configure_cuda(tf32=tf32, backends=b)
    assert applied == runtime.cuda_flags(tf32=tf32)
    assert b.cudnn.benchmark is True and b.cudnn.allow_tf32 is tf32
    assert b.cuda.matmul.allow_tf32 is tf32  # exact: off; fast: left alone (True in the stand-in)


def test_set_cuda_flags_on_torch_backends():
    import torch

    b = torch.backends
    saved = (b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    try:
        assert runtime.set_cuda_flags(tf32=False) == runtime.cuda_flags(tf32=False)
        assert b.cudnn.benchmark is True
        assert b.cudnn.allow_tf32 is False and b.cuda.matmul.allow_tf32 is False
    finally:
        b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


def test_cpu_tasks_leave_the_cuda_flags_alone(tiny_checkpoint, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a CPU task configured CUDA")

    monkeypatch.setattr(predict, "set_cuda_flags", boom)
    monkeypatch.setattr(runtime, "configure_cuda", boom)
    vol = np.random.default_rng(0).random((20, 36, 36), dtype=np.float32)
    maps = predict.predict_maps(da.from_array(vol, chunks=(20, 18, 36)), tiny_checkpoint, tiling="exact",
                                device="cpu")
    fg, _, _ = dask.compute(*maps, scheduler="synchronous")
    assert fg.shape == vol.shape and np.isfinite(fg).all()


def test_cpu_input_is_the_numpy_memory():
    batch = np.random.default_rng(1).random((2, 32, 32, 32), dtype=np.float32)
    x = runtime._as_input(batch)
    assert x.device.type == "cpu" and not x.is_pinned()
    assert x.data_ptr() == batch.ctypes.data  # no copy on CPU, as before


def test_run_network_batches_on_cpu_equals_one_by_one(tiny_checkpoint):
    model = runtime.get_network(tiny_checkpoint, "cpu")
    rng = np.random.default_rng(2)
    batches = [rng.random((2, 32, 32, 32), dtype=np.float32) for _ in range(3)]
    kept = ((8, 24), (0, 16), (16, 32))
    out = list(runtime.run_network_batches(model, iter(batches), kept=kept))
    expected = [runtime.run_network(model, b, kept=kept) for b in batches]
    assert len(out) == 3
    for a, b in zip(out, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert list(runtime.run_network_batches(model, iter([]), kept=kept)) == []


@pytest.mark.slow
def test_bench_gpu_dry_run(tmp_path, capsys):
    from benchmarks.gpu.bench_gpu import main

    rows = main(["--dry-run", "--device", "cpu", "--shape", "32", "32", "32", "--skip", "allocator",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "output voxels/s per GPU" in printed and "share of time per stage" in printed
    runs = {r["run"] for r in rows}
    assert {"exact fp32 b2", "exact bf16 b2", "fast fp32 b2", "fast bf16 b2", "numpy (1 core)"} <= runs
    saved = json.loads((tmp_path / "bench_gpu_dry_run.json").read_text())
    assert saved["config"]["dry_run"] is True and len(saved["results"]) == len(rows)
