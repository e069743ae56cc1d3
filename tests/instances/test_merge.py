"""Chunked instances: same partition (and ids) as the whole-volume reference, over chunks and halos."""

from __future__ import annotations

import logging

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from cryosiam_dask.errors import ConfigError
from cryosiam_dask.instances.components import BYTES_PER_VOXEL
from cryosiam_dask.instances.memory_store import segment_instances
from cryosiam_dask.instances.params import PostParams, margin_for
from cryosiam_dask.instances.reference import from_original_kwargs, instance_segmentation
from cryosiam_dask.testing import strategies

PARAMS = dict(min_center_distance=1.0, max_center_distance=3.0, threshold_foreground=0.5, distance_type=1)


ball_maps = strategies.ball_maps
assert_equivalent_labeling = strategies.assert_same_partition


def run_chunked(fg, dist, chunks, halo, limit_bytes=None, **params):
    kw = {} if limit_bytes is None else {"limit_bytes": limit_bytes}
    with dask.config.set(scheduler="synchronous"):
        labels, report = segment_instances(
            da.from_array(fg, chunks=chunks),
            da.from_array(dist, chunks=chunks),
            PostParams(halo=halo, **params),
            **kw,
        )
        return labels.compute(), report


def check_against_reference(fg, dist, chunks, halo, params=PARAMS, require_exact=True):
    expected = instance_segmentation(fg, dist, **params)
    out, report = run_chunked(fg, dist, chunks, halo, **params)
    assert out.dtype == np.uint32
    if require_exact:
        assert report.oversized == 0
    if report.oversized == 0:
        assert_equivalent_labeling(out, expected)
        np.testing.assert_array_equal(out, expected)  # the ids too
        assert report.n_instances == int(expected.max())
    ids = np.unique(out[out > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # consecutive 1..N
    return out, report


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    balls=strategies.balls((16, 20, 18)),
    rods=strategies.rods((16, 20, 18)),
    chunks=strategies.chunkings(6, 12),
    halo=st.sampled_from([10, 12, 16, 20]),
    distance_type=st.sampled_from([0, 1, 2]),
)
def test_property_chunked_equals_whole_volume(balls, rods, chunks, halo, distance_type):
    # rods as long as the volume and clusters of balls make support components larger than the halo: they
    # are segmented whole, so every result is exact
    fg, dist = ball_maps((16, 20, 18), balls, rods)
    params = {**PARAMS, "distance_type": distance_type}
    out, report = check_against_reference(fg, dist, chunks, halo, params)
    event(f"components segmented whole: {min(report.large, 2)}{'+' if report.large >= 2 else ''}")
    assert report.n_chunks == int(np.prod([-(-s // c) for s, c in zip(fg.shape, chunks, strict=True)]))


CHAIN_SHAPE = (20, 32, 32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=strategies.ball_chains(CHAIN_SHAPE),
    balls=strategies.balls(CHAIN_SHAPE, max_size=3),
    rods=strategies.rods(CHAIN_SHAPE, max_size=1),
    chunks=strategies.chunkings(6, 12),
    extra_halo=st.integers(1, 4),
    distance_type=st.sampled_from([0, 1, 2]),
)
def test_property_large_components_equal_whole_volume(chains, balls, rods, chunks, extra_halo, distance_type):
    # chains of touching balls (one support component each) and rods, with the halo just above the margin:
    # most examples have components larger than the halo allows; all must equal the whole-volume result
    fg, dist = ball_maps(CHAIN_SHAPE, chains + balls, rods)
    params = {**PARAMS, "distance_type": distance_type}
    halo = margin_for(distance_type) + extra_halo
    _, report = check_against_reference(fg, dist, chunks, halo, params)
    event(f"components segmented whole: {min(report.large, 2)}{'+' if report.large >= 2 else ''}")


LAYOUT = (24, 24, 24)
CHUNKS = (8, 8, 8)


@pytest.mark.parametrize(
    "centre",
    [
        (4, 4, 8),  # on a face (x = 8)
        (8, 8, 4),  # on an edge (z = y = 8)
        (8, 16, 16),  # on a corner
        (0, 0, 0),  # on the volume's corner
        (23, 12, 16),  # on the volume's far face and a chunk face
    ],
)
def test_particles_on_faces_edges_corners(centre):
    fg, dist = ball_maps(LAYOUT, [(*centre, 3.5), (16, 4, 20, 2.5)])
    out, _ = check_against_reference(fg, dist, CHUNKS, 16)
    assert out.max() >= 2


def test_touching_pair_straddling_a_face_stays_two():
    # two balls touching across the chunk face x = 12
    fg, dist = ball_maps(LAYOUT, [(12, 12, 9, 3.5), (12, 12, 15.5, 3.5)])
    expected = instance_segmentation(fg, dist, **PARAMS)
    assert int(expected.max()) == 2
    assert ndi.label(expected > 0)[1] == 1  # one foreground component, two instances
    out, _ = check_against_reference(fg, dist, (24, 24, 12), 16)
    assert out[12, 12, 9] != out[12, 12, 16]


def test_particle_spanning_three_chunks_is_one():
    fg, dist = ball_maps((16, 16, 24), [(8, 8, 12, 5.5)])
    out, _ = check_against_reference(fg, dist, (16, 16, 5), 16)
    assert int(out.max()) == 1
    assert np.unique(np.nonzero(out)[2] // 5).size >= 3


def test_empty_chunks_are_skipped():
    fg, dist = ball_maps((16, 16, 48), [(8, 8, 3, 2.5)])
    out, report = check_against_reference(fg, dist, (16, 16, 8), 12)
    assert report.n_chunks == 6
    assert report.n_skipped == 3  # windows starting at x >= 12 see no fg >= T
    assert int(out.max()) == 1


def test_no_foreground():
    fg = np.zeros(LAYOUT, np.float32)
    out, report = run_chunked(fg, fg - 5, CHUNKS, 12, **PARAMS)
    assert not out.any()
    assert report.n_instances == 0
    assert report.n_skipped == report.n_chunks == 27


@pytest.mark.parametrize("chunks,halo", [((20, 31, 22), 20), ((16, 24, 16), 24), ((40, 61, 15), 22)])
def test_golden_maps_chunked_equal_a_default(golden, golden_maps, golden_settings, chunks, halo):
    entry = golden_settings["a_default"]
    fg, dist, _ = golden_maps
    with h5py.File(golden / "postprocessing" / "a_default.h5", "r") as f:
        expected = f["instances"][:]
    kwargs = from_original_kwargs(entry["kwargs"])
    kw = {k: v for k, v in kwargs.items() if k not in ("boundary_bias", "postprocessing")}
    out, report = run_chunked(fg, dist, chunks, halo, **kw)
    assert report.oversized == 0
    np.testing.assert_array_equal(out, expected)


def rod_maps():
    shape = (16, 16, 48)
    grid = np.indices(shape)
    radial = np.sqrt((grid[0] - 8.0) ** 2 + (grid[1] - 8.0) ** 2)
    signed = 3.5 - radial
    signed[..., :4] = -5  # the rod runs from x = 4 to 43
    signed[..., 44:] = -5
    return strategies.shape_maps(signed)


def test_rod_longer_than_halo_is_exact(caplog):
    fg, dist = rod_maps()
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask.instances.chunked"):
        out, report = check_against_reference(fg, dist, (16, 16, 8), 12)
    assert report.large == 1
    assert "larger than one task" not in caplog.text


def test_rod_larger_than_the_memory_limit_is_reported(caplog):
    fg, dist = rod_maps()
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask.instances.chunked"):
        out, report = run_chunked(fg, dist, (16, 16, 8), 12, limit_bytes=1000 * BYTES_PER_VOXEL, **PARAMS)
    assert report.oversized > 0
    assert report.oversized_chunks > 0
    assert report.large == 0
    assert "larger than one task may segment whole (a crop of 1000 voxels" in caplog.text
    # with a halo covering the rod the windows are exact again
    check_against_reference(fg, dist, (16, 16, 8), 48)


BIG = (40, 64, 64)


def sheet_maps():
    """A curved membrane-like sheet, 6 voxels thick, across the whole (y, x) plane, and two particles."""
    z, y, x = np.indices(BIG, dtype=np.float64)
    surface = 20 + 5 * np.sin(x / 11.0) + 3 * np.cos(y / 9.0)
    signed = 3.0 - np.abs(z - surface)
    fg, dist = strategies.shape_maps(signed)
    bfg, bdist = ball_maps(BIG, [(5, 10, 50, 3.5), (35, 40, 12, 3)])
    return np.maximum(fg, bfg), np.maximum(dist, bdist)


def tube_maps():
    """A long bent tube crossing the volume, and a particle touching it."""
    rods = [(20, 6, 2, 12, 40, 40, 3.5), (12, 40, 40, 28, 60, 62, 3.0)]
    return ball_maps(BIG, [(24, 44, 30, 3.5)], rods)


def cluster_maps():
    """A dense cluster of touching particles (4 x 6 x 6 balls): one support component larger than the halo."""
    centres = [
        (6 + 7.0 * i, 8 + 7.0 * j, 10 + 7.0 * k, 3.6) for i in range(4) for j in range(6) for k in range(6)
    ]
    rng = np.random.default_rng(3)
    return ball_maps(BIG, [(z + rng.uniform(-0.5, 0.5), y, x, r) for z, y, x, r in centres])


@pytest.mark.parametrize("maps", [sheet_maps, tube_maps, cluster_maps])
@pytest.mark.parametrize("chunks", [(20, 24, 24), (16, 32, 20)])
def test_components_larger_than_the_halo_are_exact(maps, chunks, caplog):
    fg, dist = maps()
    support = ndi.label(instance_segmentation(fg, dist, **PARAMS) > 0, structure=np.ones((3, 3, 3)))[0]
    biggest = np.argmax(np.bincount(support.ravel())[1:]) + 1
    sizes = [np.ptp(np.nonzero(support == biggest)[a]) for a in range(3)]
    assert max(sizes) > 24 + 12  # wider than a window
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask.instances.chunked"):
        out, report = check_against_reference(fg, dist, chunks, 12)
    assert report.large >= 1
    assert caplog.text == ""
    assert np.unique(np.nonzero(out)[1] // chunks[1]).size >= 2


def test_min_center_distance_zero_makes_the_volume_one_component():
    # distance >= 0 holds everywhere (also in windows without foreground): one support component, segmented
    # whole
    fg, dist = ball_maps((16, 16, 64), [(8, 8, 5, 3.0), (8, 8, 14, 3.5)])
    params = {**PARAMS, "min_center_distance": 0.0}
    out, report = check_against_reference(fg, dist, (8, 8, 8), 10, params)
    assert report.n_skipped > 0 and report.large == 1
    assert int(out.max()) == 2


def test_running_twice_gives_the_same_result():
    fg, dist = ball_maps(LAYOUT, [(8, 8, 8, 3.5), (15, 16, 9, 3), (4, 20, 20, 2.5)])
    a, ra = run_chunked(fg, dist, CHUNKS, 16, **PARAMS)
    b, rb = run_chunked(fg, dist, CHUNKS, 16, **PARAMS)
    np.testing.assert_array_equal(a, b)
    assert ra == rb


def test_distributed_client(client):
    fg, dist = ball_maps(LAYOUT, [(8, 8, 8, 3.5), (15, 16, 9, 3), (4, 20, 20, 2.5)])
    labels, report = segment_instances(
        da.from_array(fg, chunks=CHUNKS), da.from_array(dist, chunks=CHUNKS), PostParams(halo=16, **PARAMS)
    )
    out = labels.compute()
    np.testing.assert_array_equal(out, instance_segmentation(fg, dist, **PARAMS))
    assert report.n_instances == int(out.max()) >= 3


def test_errors():
    a = da.zeros((10, 10, 10), chunks=5, dtype=np.float32)
    with pytest.raises(ConfigError, match="halo is 4 but must exceed 9"):
        PostParams(halo=4, **PARAMS)
    with pytest.raises(ConfigError, match="halo must be an integer >= 0, got"):
        PostParams(halo=(20, 20), **PARAMS)
    with pytest.raises(ConfigError, match="must be 3-d arrays of one shape"):
        segment_instances(a, a[:5], PostParams(**PARAMS))
    with pytest.raises(ConfigError, match="min_center_distance must be a finite number"):
        PostParams(**{**PARAMS, "min_center_distance": float("nan")})
    with pytest.raises(ConfigError, match="threshold is not a post-processing parameter"):
        PostParams.from_kwargs(threshold=0.5)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    from benchmarks.bench_instances import main

    rows = main(["--shape", "24", "32", "32", "--chunks", "16", "--halo", "14", "--out", str(tmp_path)])
    assert [r["run"] for r in rows] == [
        "in-memory reference",
        "chunked, 1 worker(s)",
        "chunked, 2 worker(s)",
        "store stage, 1 worker(s)",
        "store stage, 2 worker(s)",
    ]
    assert all(r["ids_equal_reference"] for r in rows[1:])
    assert all(r["worker_cpu_s"] > 0 and "speedup_vs_1_worker" in r for r in rows[1:])
    assert (tmp_path / "bench_instances_24x32x32.json").is_file()


def _run_maps(fg, dist, chunks, store=None):
    from cryosiam_dask.run.maps import Maps

    arrays = [fg, dist, np.zeros_like(fg)]
    if store is None:
        arrays = [da.from_array(a, chunks=chunks) for a in arrays]
    else:  # as the pipeline reads them: straight from a zarr store
        import zarr

        group = zarr.open_group(str(store), mode="w")
        zs = []
        for name, a in zip(("foreground", "distances", "boundaries"), arrays, strict=True):
            zs.append(group.create_array(name, shape=a.shape, chunks=chunks, dtype=np.float32))
            zs[-1][...] = a
        arrays = [da.from_zarr(z, chunks=chunks) for z in zs]
    return Maps(*arrays, key="tube", raw_reused=False, report={})


@pytest.mark.parametrize("backed", ["memory", "zarr"])
def test_run_layer_segments_large_components_whole_and_resumes(tmp_path, backed, monkeypatch):
    from cryosiam_dask.io.sources import zarr_source
    from cryosiam_dask.run import segment
    from cryosiam_dask.run.segment import segment_one
    from cryosiam_dask.run.settings import InstanceSettings

    fg, dist = tube_maps()
    chunks = (20, 24, 24)
    maps = _run_maps(fg, dist, chunks, tmp_path / "maps.zarr" if backed == "zarr" else None)
    # zarr-backed maps: each window task reads its own window (no dask slicing)
    assert (zarr_source(maps.foreground) is not None) == (backed == "zarr")
    assert zarr_source(maps.foreground[1:]) is None
    settings = InstanceSettings(post=PostParams(**PARAMS, halo=12))
    expected = instance_segmentation(fg, dist, **PARAMS)
    work = tmp_path / "work"
    with dask.config.set(scheduler="synchronous"):
        first = segment_one("tube", maps, settings, work)
        np.testing.assert_array_equal(first.labels.compute(), expected)
        assert first.report["large"] >= 1 and first.report["oversized"] == 0
        assert first.report["large_computed"] == first.report["large"]
        second = segment_one("tube", maps, settings, work)  # everything reused
        assert second.report["windows_computed"] == 0 and second.report["large_computed"] == 0
        assert second.report["label_chunks_computed"] == 0
        np.testing.assert_array_equal(second.labels.compute(), expected)
        # a rerun under a memory limit too small for the tube: the windows are reused, the labels rewritten
        monkeypatch.setattr(segment, "task_memory_limit", lambda: 1000 * BYTES_PER_VOXEL)
        third = segment_one("tube", maps, settings, work)
        assert third.report["windows_computed"] == 0 and third.report["oversized"] > 0
        assert third.report["label_chunks_computed"] == int(np.prod(third.labels.numblocks))
        out = third.labels.compute()
        ids = np.unique(out[out > 0])
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))


def test_task_memory_limit_follows_the_workers():
    from distributed import Client, LocalCluster

    from cryosiam_dask.instances.components import DEFAULT_LIMIT_BYTES
    from cryosiam_dask.run.segment import task_memory_limit

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, memory_limit="2GB", dashboard_address=None
    ) as cluster, Client(cluster):
        assert task_memory_limit() == 2 * 10**9 // 2 // 2  # half the worker's memory per thread
    assert task_memory_limit() == DEFAULT_LIMIT_BYTES  # no client
