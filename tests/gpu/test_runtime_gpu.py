"""The network on CUDA: flags, pinned non-blocking input, the pipelined batch loop, exact vs CPU, amp."""

from __future__ import annotations

import numpy as np
import pytest

from cryosiam_dask.network import runtime
from cryosiam_dask.testing.checkpoints import write_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A tiny checkpoint with random weights on every layer (patch 32)."""
    return write_checkpoint(tmp_path_factory.mktemp("gpu_ckpt") / "tiny_random.ckpt", arch="tiny",
                            patch_size=32, seed=3)


@pytest.fixture
def restore_flags(torch_cuda):
    b = torch_cuda.backends
    saved = (b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    yield b
    b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


def _batch(seed: int, n: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, size)).astype(np.float32)


@pytest.mark.parametrize("tf32", [False, True])
def test_set_cuda_flags_sets_the_cuda_flags(restore_flags, tf32):
    b = restore_flags
    b.cuda.matmul.allow_tf32 = True
    applied = runtime.set_cuda_flags(tf32=tf32)
    assert applied == runtime.cuda_flags(tf32=tf32)
    assert b.cudnn.benchmark is True
    assert b.cudnn.allow_tf32 is tf32
    assert b.cuda.matmul.allow_tf32 is tf32  # exact: off; fast: left as it was (True here)


def test_input_goes_through_pinned_memory(torch_cuda, random_ckpt):
    model = runtime.get_network(random_ckpt, "cuda")
    batch = _batch(0)
    x = runtime._as_input(batch).pin_memory().to(next(model.parameters()).device, non_blocking=True)
    assert x.is_cuda and tuple(x.shape) == (3, 1, 32, 32, 32)
    np.testing.assert_array_equal(x.cpu().numpy()[:, 0], batch)


def test_exact_cuda_equals_cpu(restore_flags, random_ckpt):
    runtime.set_cuda_flags(tf32=False)
    cpu, gpu = runtime.get_network(random_ckpt, "cpu"), runtime.get_network(random_ckpt, "cuda")
    batch = _batch(1)
    kept = ((8, 24), (0, 16), (16, 32))
    expected = runtime.run_network(cpu, batch, kept=kept)
    out = runtime.run_network(gpu, batch, kept=kept)
    assert out.shape == expected.shape == (3, 3, 16, 16, 16) and out.dtype == np.float32
    scale = np.abs(expected).max(axis=(0, 2, 3, 4), keepdims=True)
    assert (np.abs(out - expected) / scale).max() <= 2e-5


def test_batches_pipelined_equal_one_by_one(restore_flags, random_ckpt):
    runtime.set_cuda_flags(tf32=False)
    model = runtime.get_network(random_ckpt, "cuda")
    batches = [_batch(s, n=2) for s in range(5)]
    kept = ((8, 24), (8, 24), (8, 24))
    one_by_one = [runtime.run_network(model, b, kept=kept) for b in batches]
    made: list[int] = []

    def lazily():
        for i, b in enumerate(batches):
            made.append(i)
            yield b

    stream = runtime.run_network_batches(model, lazily(), kept=kept)
    first = next(stream)
    assert made == [0, 1]  # batch 1 was taken (and uploaded) before batch 0's result came back
    out = [first, *stream]
    assert len(out) == 5
    for a, b in zip(out, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_close_to_float32(restore_flags, random_ckpt, amp):
    runtime.set_cuda_flags(tf32=True)
    model = runtime.get_network(random_ckpt, "cuda")
    batch = _batch(2)
    ref = runtime.run_network(model, batch)
    out = runtime.run_network(model, batch, amp=amp)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    scale = np.abs(ref).max(axis=(0, 2, 3, 4), keepdims=True)
    assert (np.abs(out - ref) / scale).max() < 5e-2


def test_channels_last_weights_on_cuda(torch_cuda, random_ckpt):
    model = runtime.get_network(random_ckpt, "cuda")
    assert model.stem.weight.is_contiguous(memory_format=torch_cuda.channels_last_3d)
