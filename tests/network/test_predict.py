"""Tests of inference.py: MONAI normalisation, CryoSiam's tiling, the chunked exact and fast tilings."""

from __future__ import annotations

import itertools
import logging

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cryosiam_dask.errors import ConfigError, InputFileError
from cryosiam_dask.network import normalize, predict, reference, runtime
from cryosiam_dask.network import tiling as tl

logger = logging.getLogger(__name__)
PATCH = (16, 16, 16)
NORM = {"a_min": 0.0, "a_max": 1.0, "mean": 0.0, "std": 1.0}


class StandIn(nn.Module):
    """Tiny fully convolutional network with the model's interface: stride 8 down, back up, three maps."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv3d(1, 4, 3, padding=1)
        self.down = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Conv3d(8, 3, 3, padding=1)
        with torch.no_grad():
            for m in (self.c1, self.down, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        self.calls = 0
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls += 1
        a = torch.relu(self.c1(x))
        b = a
        for _ in range(3):
            b = torch.relu(self.down(b))
        b = F.interpolate(b, size=a.shape[2:], mode="trilinear", align_corners=False)
        o = self.head(torch.cat([a, b], 1))
        return torch.sigmoid(o[:, :1]), 0.2 * o[:, 1:2], torch.sigmoid(o[:, 2:3])  # distances of a few voxels

    def forward_kept(self, x: torch.Tensor, kept, amp=None) -> torch.Tensor:
        """The prepared network's interface: the whole window computed, then cropped to `kept`."""
        maps = torch.cat(self.forward(x), 1)
        return maps[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in kept))]


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """A checkpoint path whose network is `StandIn` (patch 16), with a fresh per-process cache."""
    net = StandIn()
    path = tmp_path / "standin.ckpt"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(runtime, "_load_network", lambda p, device: net)
    monkeypatch.setattr(predict, "read_patch_size", lambda p: PATCH)
    monkeypatch.setattr(runtime, "_CACHE", {})
    monkeypatch.setattr(runtime, "_LOADS", {"count": 0})
    return path, net


def _maps(tomogram, path, **kw):
    return dask.compute(*predict.predict_maps(tomogram, path, **kw), scheduler="sync")


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    ("a_min", "a_max", "mean", "std"),
    [(0, 1, 0, 1), (0.1, 0.7, 0.3, 0.21), (-3.3, 17.1, 0.123456789, 3.3), (0.5, 0.5, 0.1, 2.0),
     (0, 1, 0.2, 0)],
)
@pytest.mark.filterwarnings("ignore:Divide by zero")  # MONAI warns when a_min == a_max
def test_normalize_block_matches_monai(a_min, a_max, mean, std):
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    x = np.random.default_rng(1).normal(0.5, 2.0, (7, 9, 5)).astype(np.float32)
    before = x.copy()
    t = ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)(torch.from_numpy(x))
    expected = NormalizeIntensity(subtrahend=mean, divisor=std)(t).numpy()
    got = normalize.normalize_block(x, a_min=a_min, a_max=a_max, mean=mean, std=std)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(x, before)


def test_normalize_block_edge_cases():
    x = np.array([[[-1.0, 0.25, 3.0]]], np.float32)
    # max == min: x - min only, no clip
    np.testing.assert_array_equal(normalize.normalize_block(x, a_min=2, a_max=2, mean=0, std=1), x - 2)
    # clip to [0, 1], std 0 counts as 1
    got = normalize.normalize_block(x, a_min=0, a_max=1, mean=0.5, std=0)
    np.testing.assert_array_equal(got, [[[-0.5, -0.25, 0.5]]])
    # integer input gives float32
    ints = np.arange(8, dtype=np.int16).reshape(2, 2, 2)
    assert normalize.normalize_block(ints, **NORM).dtype == np.float32


def test_volume_stats_is_population_std_of_scaled_volume():
    x = np.random.default_rng(2).normal(0.4, 0.5, (10, 12, 9)).astype(np.float32)
    mean, std = normalize.volume_stats(da.from_array(x, chunks=(4, 5, 9)), a_min=0.0, a_max=1.0)
    scaled = np.clip(x, 0, 1).astype(np.float64)
    assert mean == pytest.approx(scaled.mean(), rel=1e-6)
    assert std == pytest.approx(scaled.std(ddof=0), rel=1e-6)


# --------------------------------------------------------------------------- the original's tiling
@pytest.mark.parametrize(("size", "patch"), [(40, 32), (61, 32), (44, 32), (32, 32), (160, 64)])
def test_kept_ranges_cover_and_match_readme(size, patch):
    owned = tl._owned_ranges(size, patch)
    covered = np.concatenate([np.arange(lo, hi) for _, lo, hi in owned])
    np.testing.assert_array_equal(covered, np.arange(size))
    if (size, patch) == (61, 32):  # golden README: y keeps [0,24) [24,40) [40,61) [56,61), the last one wins
        assert tl.kept_ranges(61, 32) == [(0, 0, 24), (16, 24, 40), (32, 40, 61), (48, 56, 61)]
        assert owned[-2:] == [(32, 40, 56), (48, 56, 61)]


def test_predict_whole_matches_golden_maps(golden):
    import h5py
    import mrcfile

    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model

    ckpt = load_checkpoint(golden / "model" / "cryosiam_instance_tiny.ckpt")
    volume = normalize.normalize_block(mrcfile.read(golden / "data" / "TS_tiny.mrc"), **NORM)
    with h5py.File(golden / "lamella" / "TS_tiny_preds.h5") as f:
        mask = f["labels"][:].astype(np.int8)
    maps = reference.predict_whole(volume, build_model(ckpt), patch_size=patch_size_of(ckpt), batch_size=2)
    with h5py.File(golden / "predictions" / "TS_tiny_preds.h5") as f:
        keys = ("foreground", "distances", "boundaries")
        for got, key, tol in zip(maps, keys, (1e-5, 2e-5, 1e-5), strict=True):
            assert got.dtype == np.float32 and got.shape == volume.shape
            np.testing.assert_allclose(got * mask, f[key][:], rtol=0, atol=tol, err_msg=key)


# --------------------------------------------------------------------------- chunked exact == whole
@pytest.mark.parametrize(
    ("shape", "chunks"),
    [
        ((23, 30, 19), (10, 13, 7)),  # chunks smaller than the patch, nothing a multiple of anything
        ((37, 45, 29), (20, 17, 29)),
        ((37, 45, 29), (37, 45, 29)),  # one chunk
        ((9, 13, 20), (4, 7, 9)),  # smaller than one patch in z and y (SpatialPad zeros, then wrap)
    ],
)
def test_exact_chunked_equals_whole(standin, shape, chunks):
    path, net = standin
    raw = np.random.default_rng(3).normal(0.5, 0.4, shape).astype(np.float32)
    ref = reference.predict_whole(normalize.normalize_block(raw, **NORM), net, patch_size=PATCH, batch_size=3)
    maps = _maps(da.from_array(raw, chunks=chunks), path, tiling="exact", batch_size=2)
    for got, want in zip(maps, ref, strict=True):
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_ranges", [None, 1, 3])
def test_exact_maps_do_not_depend_on_the_block_split(standin, block_ranges):
    """One chunk split into inference blocks of at most `block_ranges` patches per axis: the same maps."""
    path, net = standin
    shape = (37, 45, 29)
    raw = np.random.default_rng(5).normal(0.5, 0.4, shape).astype(np.float32)
    ref = reference.predict_whole(normalize.normalize_block(raw, **NORM), net, patch_size=PATCH, batch_size=2)
    net.calls = 0
    maps = _maps(da.from_array(raw, chunks=shape), path, tiling="exact", block_ranges=block_ranges)
    distinct = [len(tl.owned_edges(n, p)) - 1 for n, p in zip(shape, PATCH, strict=True)]
    assert net.calls == int(np.prod(distinct))
    for got, want in zip(maps, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("n", "chunk_edges", "patch", "max_ranges"), [
    (160, [0, 160], 64, 2), (160, [0, 160], 64, 1), (160, [0, 70, 160], 64, 2),
    (1000, [0, 256, 512, 768, 1000], 64, 2), (61, [0, 61], 32, 3), (37, [0, 10, 20, 30, 37], 16, 2),
    (20, [0, 20], 64, 2),
])
def test_inference_edges_split_blocks_on_the_grid(n, chunk_edges, patch, max_ranges):
    grid = tl.owned_edges(n, patch)
    edges = tl.inference_edges(n, chunk_edges, patch, max_ranges)
    unsplit = tl.inference_edges(n, chunk_edges, patch, None)
    assert edges[0] == 0 and edges[-1] == n and edges == sorted(set(edges))
    assert set(unsplit) <= set(edges) <= set(grid)  # the chunk-snapped edges stay, every edge is a grid edge
    blocks = list(itertools.pairwise(edges))
    per_block = [sum(a <= g < b for g in grid[:-1]) for a, b in blocks]
    assert max(per_block) <= max_ranges
    for a, b in itertools.pairwise(unsplit):  # an unsplit block is cut into as few, as even pieces as can be
        inside = [k for (lo, hi), k in zip(blocks, per_block, strict=True) if a <= lo and hi <= b]
        assert len(inside) == -(-sum(inside) // max_ranges) and max(inside) - min(inside) <= 1
    with pytest.raises(ValueError, match="max_ranges"):
        tl.inference_edges(n, chunk_edges, patch, 0)


@pytest.mark.parametrize("chunks", [(10, 13, 7), (20, 17, 29), (37, 45, 29), (5, 45, 3)])
def test_exact_evaluates_each_patch_once_whatever_the_chunking(standin, chunks):
    """Network calls (batch 1) == the original's distinct kept patches, for chunks on and off the grid."""
    path, net = standin
    shape = (37, 45, 29)
    raw = np.random.default_rng(3).normal(0.5, 0.4, shape).astype(np.float32)
    total, distinct = tl.exact_patch_evaluations(shape, da.zeros(shape, chunks=chunks).chunks, PATCH)
    kept = [len(tl.owned_edges(n, p)) - 1 for n, p in zip(shape, PATCH, strict=True)]
    assert total == distinct == int(np.prod(kept))
    net.calls = 0
    tomogram = da.from_array(raw, chunks=chunks)
    lazy = predict.predict_maps(tomogram, path, tiling="exact", batch_size=1)
    assert all(m.chunks == tomogram.chunks for m in lazy)  # rechunked back to the storage chunks
    dask.compute(*lazy, scheduler="sync")
    assert net.calls == distinct


# --------------------------------------------------------------------------- fast
@pytest.mark.parametrize("window", [32, 48])
def test_fast_maps_do_not_depend_on_the_chunking(standin, window):
    """fast's cores lie on a grid of the volume: the same windows, so the same maps, for any chunks."""
    path, net = standin
    shape = (30, 41, 36)
    raw = np.random.default_rng(6).normal(0.5, 0.3, shape).astype(np.float32)
    maps = []
    for chunks in [shape, (15, 21, 36), (7, 9, 11), (30, 5, 36)]:
        tomogram = da.from_array(raw, chunks=chunks)
        lazy = predict.predict_maps(tomogram, path, tiling="fast", margin=8, window=window)
        assert all(m.chunks == tomogram.chunks for m in lazy)
        net.calls = 0
        maps.append(dask.compute(*lazy, scheduler="sync"))
        core = window - 16
        assert net.calls == int(np.prod([-(-n // core) for n in shape]))  # one window per core
    for other in maps[1:]:
        for got, want in zip(other, maps[0], strict=True):
            np.testing.assert_array_equal(got, want)


def test_fast_close_to_exact(standin):
    path, _ = standin
    raw = np.random.default_rng(4).normal(0.5, 0.2, (30, 41, 36)).astype(np.float32)
    raw = np.clip(np.cumsum(raw, axis=2) / 20, 0, 1).astype(np.float32)  # smooth-ish, like a tomogram
    tomogram = da.from_array(raw, chunks=(15, 21, 36))
    exact = _maps(tomogram, path, tiling="exact")
    fast = _maps(tomogram, path, tiling="fast", margin=8, window=32)
    for name, f, e in zip(("foreground", "distance", "boundary"), fast, exact, strict=True):
        diff = np.abs(f - e)
        logger.info("fast vs exact %s: max %.3g mean %.3g", name, diff.max(), diff.mean())
        assert f.shape == e.shape and f.dtype == np.float32
        assert diff.mean() < 0.25 * np.abs(e).mean() + 1e-3  # loose: fast sees other context than exact


# --------------------------------------------------------------------------- mask, caching, errors
def test_masked_out_chunks_skip_the_network(standin):
    path, net = standin
    raw = np.random.default_rng(5).random((24, 20, 20), dtype=np.float32)
    mask = np.zeros(raw.shape, np.int8)
    mask[14:20] = 1  # only the second z chunk of 12 has lamella
    tomogram = da.from_array(raw, chunks=(12, 20, 20))
    lamella = da.from_array(mask, chunks=(12, 20, 20))
    net.calls = 0
    full = _maps(tomogram, path, tiling="exact", batch_size=1)
    calls_full, net.calls = net.calls, 0
    masked = _maps(tomogram, path, tiling="exact", batch_size=1, mask=lamella)
    assert 0 < net.calls < calls_full
    skipped = predict.patch_skip_fraction(lamella, PATCH)
    assert net.calls == round((1 - skipped) * calls_full)  # patches whose kept range misses the lamella
    for m, f in zip(masked, full, strict=True):
        np.testing.assert_array_equal(m, f * mask)
        assert not m[:12].any()
    net.calls = 0
    _maps(tomogram, path, tiling="exact", mask=da.zeros(raw.shape, np.int8, chunks=12))
    assert net.calls == 0


def test_network_loaded_once_per_process(standin, client):
    path, _ = standin
    tomogram = da.from_array(np.random.default_rng(6).random((20, 20, 20), dtype=np.float32), chunks=8)
    for tiling in ("exact", "fast"):
        dask.compute(*predict.predict_maps(tomogram, path, tiling=tiling))
    assert runtime.cache_info() == {"loads": 1, "cached": 1}


def test_predict_maps_rejects_bad_input(standin, tmp_path):
    path, _ = standin
    tomogram = da.zeros((8, 8, 8), np.float32, chunks=4)
    with pytest.raises(InputFileError, match="missing.ckpt"):
        predict.predict_maps(tomogram, tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="tiling"):
        predict.predict_maps(tomogram, path, tiling="approximate")
    with pytest.raises(ConfigError, match=r"mask is \(8, 8, 9\)"):
        predict.predict_maps(tomogram, path, mask=da.zeros((8, 8, 9), np.int8))
    with pytest.raises(ConfigError, match="margin"):
        predict.predict_maps(tomogram, path, tiling="fast", margin=16, window=32)


def test_null_mean_std_use_volume_statistics(standin):
    path, net = standin
    raw = np.random.default_rng(7).random((12, 14, 10), dtype=np.float32)
    fg, _, _ = _maps(da.from_array(raw, chunks=(6, 7, 10)), path, tiling="exact", data=(0, 1, None, None))
    mean, std = raw.astype(np.float64).mean(), raw.astype(np.float64).std()
    volume = normalize.normalize_block(raw, a_min=0, a_max=1, mean=mean, std=std)
    want = reference.predict_whole(volume, net, patch_size=PATCH, batch_size=2)[0]
    np.testing.assert_allclose(fg, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_exact_under_multiprocess_cluster(golden):
    from distributed import Client, LocalCluster

    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
    from cryosiam_dask.network.model import build_model

    path = golden / "model" / "cryosiam_instance_tiny.ckpt"
    ckpt = load_checkpoint(path)
    raw = np.random.default_rng(8).random((20, 36, 34), dtype=np.float32)
    volume = normalize.normalize_block(raw, **NORM)
    ref = reference.predict_whole(volume, build_model(ckpt), patch_size=patch_size_of(ckpt), batch_size=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            maps = predict.predict_maps(da.from_array(raw, chunks=(20, 20, 17)), path, tiling="exact")
            got = client.compute(list(maps), sync=True)
            loads = client.run(lambda: runtime.cache_info()["loads"])
    # probabilities within 1e-5, distances (up to ~6 voxels) within 2e-5: the golden fixture's float32 budget
    for g, w, tol in zip(got, ref, (1e-5, 2e-5, 1e-5), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)
    assert all(n <= 1 for n in loads.values()) and sum(loads.values()) >= 1


@pytest.mark.slow
def test_bench_inference_smoke(tmp_path):
    from benchmarks.bench_inference import main

    args = ["--shape", "20", "24", "24", "--arch", "tiny", "--chunks", "20", "12", "24"]
    args += ["--out", str(tmp_path)]
    rows = main(args)
    assert [r["run"] for r in rows] == ["whole (original)", "chunked exact", "chunked fast"]
    assert rows[1]["foreground_vs_whole_max"] < 1e-5
    assert list(tmp_path.glob("bench_inference_tiny_*.json"))
