"""The multicut post-processing against CryoSiam's multicut goldens and bioimage-cpp; chunked equals whole."""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest
from skimage.segmentation import join_segmentations

from cryosiam_dask.errors import NotSupportedError
from cryosiam_dask.instances import bilateral as bl
from cryosiam_dask.instances import multicut as mc

MULTICUT_GOLDENS = ["multicut_a_default", "multicut_b_bias0.7", "multicut_c_T0.5_dt2"]


def _read(path: Path, dataset: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[dataset][()]


@pytest.fixture(scope="module")
def post(golden) -> Path:
    return golden / "postprocessing"


@pytest.fixture(scope="module")
def settings(golden_settings) -> dict:
    return golden_settings


@pytest.fixture(scope="module")
def boundaries(golden_maps) -> np.ndarray:
    return golden_maps[2]


@pytest.fixture(scope="module")
def bilateral_golden(post) -> np.ndarray:
    return _read(post / "bilateral_boundaries.h5", "boundaries")


@pytest.fixture(scope="module")
def fragments(post, settings):
    """The watershed fragments each multicut golden starts from."""
    return lambda name: _read(post / settings[name]["watershed_fragments_file"], "instances")


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    n_joint = np.unique(join_segmentations(a, b)).size
    return n_joint == np.unique(a).size == np.unique(b).size and np.array_equal(a == 0, b == 0)


def _blocks(shape: tuple[int, ...], chunks: tuple[int, ...]):
    """Yield the (start, stop) tuples of a regular chunking."""
    ranges = [[(s, min(s + c, n)) for s in range(0, n, c)] for n, c in zip(shape, chunks, strict=True)]
    yield from itertools.product(*ranges)


# ------------------------------------------------------------------------------------------ bilateral


def test_bilateral_matches_itk_bit_for_bit(boundaries, bilateral_golden):
    out = bl.bilateral_filter(boundaries)
    assert out.dtype == np.float32
    assert out.shape == boundaries.shape
    assert np.array_equal(out, bilateral_golden)


def test_bilateral_reach():
    assert bl.bilateral_reach(1.0) == 3
    assert bl.bilateral_reach(0.5) == 2
    assert bl.bilateral_reach(2.0) == 5


@pytest.mark.parametrize("chunks", [(7, 8, 9), (10, 23, 13), (4, 6, 26)])
def test_bilateral_blockwise_with_halo_equals_whole(chunks):
    rng = np.random.default_rng(0)
    shape = (17, 23, 26)
    # smooth-ish values plus steps, so that many differences fall inside and outside the 0.4 cutoff
    vol = (rng.random(shape) * 0.3 + (rng.random(shape) > 0.7) * 0.5).astype(np.float32)
    whole = bl.bilateral_filter(vol)
    r = bl.bilateral_reach(1.0)
    padded = np.pad(vol, r, mode="edge")  # == map_overlap(depth=r, boundary='nearest') halos
    for box in _blocks(shape, chunks):
        core = tuple(slice(a, b) for a, b in box)
        block = padded[tuple(slice(a, b + 2 * r) for a, b in box)]
        trimmed = bl.bilateral_filter(block)[(slice(r, -r),) * 3]
        assert np.array_equal(trimmed, whole[core]), box
        assert np.array_equal(bl.bilateral_filter_valid(block), whole[core]), box


# ------------------------------------------------------------------------------------------ edge stats


@pytest.mark.parametrize("name", ["multicut_a_default", "multicut_c_T0.5_dt2"])
def test_edge_stats_equals_bioimage_cpp(fragments, settings, bilateral_golden, name):
    from bioimage_cpp import graph as bgraph

    ws = fragments(name)
    u, v, sums, counts = mc.edge_stats(ws, bilateral_golden)
    assert u.dtype == v.dtype == np.uint64 and sums.dtype == np.float64 and counts.dtype == np.int64
    rag = bgraph.region_adjacency_graph(ws)
    feats = bgraph.features.edge_map_features(rag, ws, bilateral_golden)
    uv = rag.uv_ids()
    assert np.array_equal(uv[:, 0], u) and np.array_equal(uv[:, 1], v)
    assert np.all(u < v)
    assert np.abs(sums / counts - feats[:, 0]).max() <= 1e-6
    assert np.array_equal(2 * feats[:, 1], counts)  # bioimage-cpp's size column counts pairs
    assert u.size == settings[name]["rag_edges"]


def _chunked_edge_stats(labels, values, chunks):
    results = []
    for box in _blocks(labels.shape, chunks):
        halo = tuple(1 if a > 0 else 0 for a, _ in box)
        sl = tuple(slice(a - h, b) for (a, b), h in zip(box, halo, strict=True))
        results.append(mc.edge_stats(labels[sl], values[sl], low_halo=halo))
    return mc.merge_edge_stats(results)


def _assert_stats_equal(got, want):
    assert np.array_equal(got[0], want[0])
    assert np.array_equal(got[1], want[1])
    assert np.array_equal(got[3], want[3])
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("chunks", [(16, 20, 11), (9, 32, 44)])
def test_chunked_edge_stats_equals_whole_golden(fragments, settings, bilateral_golden, chunks):
    ws = fragments("multicut_c_T0.5_dt2")
    _assert_stats_equal(
        _chunked_edge_stats(ws, bilateral_golden, chunks), mc.edge_stats(ws, bilateral_golden)
    )


@pytest.mark.parametrize("chunks", [(3, 4, 5), (5, 1, 7)])
def test_chunked_edge_stats_equals_whole_random(chunks):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=(11, 9, 13)).astype(np.uint64)
    values = rng.random(labels.shape).astype(np.float32)
    _assert_stats_equal(_chunked_edge_stats(labels, values, chunks), mc.edge_stats(labels, values))


def test_edge_stats_no_edges():
    u, v, s, c = mc.edge_stats(np.ones((3, 4, 5), np.uint32), np.zeros((3, 4, 5), np.float32))
    assert u.size == v.size == s.size == c.size == 0


# ------------------------------------------------------------------------------------------ multicut


@pytest.mark.parametrize("name", MULTICUT_GOLDENS)
def test_multicut_postprocess_matches_golden(post, fragments, settings, boundaries, name):
    s = settings[name]
    ws = fragments(name)
    expected = _read(post / s["file"], "instances")
    out = mc.multicut_postprocess(ws, boundaries, boundary_bias=s["kwargs"]["boundary_bias"])
    assert out.dtype == np.uint32 and out.shape == expected.shape
    assert _same_partition(out, expected)
    assert int(out.max()) == s["instances"]
    assert np.array_equal(out, expected)  # ids identical too (join_segmentations numbering replicated)


@pytest.mark.parametrize("name", MULTICUT_GOLDENS)
def test_costs_margin_as_recorded(fragments, settings, bilateral_golden, name):
    s = settings[name]
    _, _, sums, counts = mc.edge_stats(fragments(name), bilateral_golden)
    costs = mc.probabilities_to_costs(
        (sums / counts).astype(np.float32), boundary_bias=s["kwargs"]["boundary_bias"]
    )
    assert costs.dtype == np.float32
    assert abs(float(np.abs(costs).min()) - s["smallest_abs_edge_cost"]) < 1e-6


def test_sparse_ids_give_same_result(post, fragments, settings, boundaries):
    s = settings["multicut_b_bias0.7"]
    ws = fragments("multicut_b_bias0.7")
    expected = _read(post / s["file"], "instances")
    sparse = np.where(ws > 0, 3 * ws.astype(np.uint32) + 5, 0).astype(np.uint32)  # monotone, with gaps
    out = mc.multicut_postprocess(sparse, boundaries, boundary_bias=s["kwargs"]["boundary_bias"])
    assert np.array_equal(out, expected)


def test_boundary_bias_one_skips(fragments, settings, boundaries):
    ws = fragments("multicut_a_default")
    out = mc.multicut_postprocess(ws, boundaries, boundary_bias=1)
    assert np.array_equal(out, ws) and out.dtype == np.uint32


def _cryosiam_join(ws: np.ndarray, node_labels: np.ndarray) -> np.ndarray:
    """Direct transcription of CryoSiam's step: project, clear merged voxels, join_segmentations."""
    seg = node_labels[ws]
    ws = ws.copy()
    ws[seg > 0] = 0
    return join_segmentations(seg, ws)


@pytest.mark.parametrize("name", MULTICUT_GOLDENS)
def test_join_segmentations_equals_lut_golden(post, fragments, settings, bilateral_golden, name):
    s = settings[name]
    ws = fragments(name)
    u, v, sums, counts = mc.edge_stats(ws, bilateral_golden)
    nl = mc.solve_multicut(
        u, v, sums, counts, boundary_bias=s["kwargs"]["boundary_bias"], n_nodes=int(ws.max()) + 1
    )
    assert nl[0] == 0
    lut = mc.final_id_table(nl, np.unique(ws))
    want = _cryosiam_join(ws, nl)
    assert np.array_equal(lut[ws], want)
    assert np.array_equal(want, _read(post / s["file"], "instances"))
    n_bg_cluster = int(np.sum(nl[1:] == 0))
    assert n_bg_cluster == s["fragments_in_background_cluster"]


@pytest.mark.parametrize("seed", range(6))
def test_join_segmentations_equals_lut_random(seed):
    rng = np.random.default_rng(seed)
    n_ids = 12
    ws = rng.integers(0, n_ids, size=(6, 7, 8)).astype(np.uint32)
    ws[ws == 5] = 0  # an absent id
    node_labels = rng.integers(0, 4, size=n_ids).astype(np.uint64)
    if seed % 2:
        node_labels[0] = 2  # background in a non-zero cluster: CryoSiam's nifty case, still transcribed
    lut = mc.final_id_table(node_labels, np.unique(ws))
    assert np.array_equal(lut[ws], _cryosiam_join(ws, node_labels))


# ------------------------------------------------------------------------------------------ chunked
def _spans_a_face(labels: np.ndarray, ids: np.ndarray, chunks: tuple[int, ...]) -> bool:
    """Whether one of `ids` has voxels on both sides of a chunk face."""
    for axis, c in enumerate(chunks):
        for face in range(c, labels.shape[axis], c):
            lo = np.take(labels, face - 1, axis=axis)
            hi = np.take(labels, face, axis=axis)
            if np.intersect1d(np.unique(lo[np.isin(lo, ids)]), np.unique(hi[np.isin(hi, ids)])).size:
                return True
    return False


@pytest.mark.parametrize("name", MULTICUT_GOLDENS)
@pytest.mark.parametrize("chunks", [(20, 31, 22), (13, 17, 11)])
def test_chunked_multicut_equals_whole(fragments, settings, boundaries, name, chunks):
    import dask
    import dask.array as da

    ws = fragments(name)
    bias = settings[name]["kwargs"]["boundary_bias"]
    whole = mc.multicut_postprocess(ws, boundaries, boundary_bias=bias)
    with dask.config.set(scheduler="synchronous"):
        lazy, n = mc.multicut_chunked(da.from_array(ws.astype(np.uint32), chunks=chunks),
                                      da.from_array(boundaries, chunks=chunks), boundary_bias=bias)
        got = lazy.compute()
    assert np.array_equal(got, whole)  # ids too
    assert n == int(whole.max())
    # the multicut joined fragments into one instance: that instance crosses a chunk face here
    pairs = np.unique(np.stack([whole.ravel(), ws.ravel()]), axis=1)
    ids, counts = np.unique(pairs[0][pairs[1] > 0], return_counts=True)
    merged = ids[counts > 1]
    assert merged.size >= 1
    if chunks == (13, 17, 11):
        assert _spans_a_face(whole, merged, chunks)


def test_multicut_missing_extra_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bioimage(name, *args, **kwargs):
        if name.startswith("bioimage_cpp"):
            raise ImportError("no bioimage_cpp")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bioimage)
    with pytest.raises(NotSupportedError, match=r"needs bioimage-cpp, a dependency of cryosiam_dask") as e:
        mc.check_multicut_available()
    assert "\n" not in str(e.value)
