"""Chunked instances: same partition (and ids) as the whole-volume reference, over chunks and halos."""

from __future__ import annotations

import logging

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from cryosiam_dask.errors import ConfigError
from cryosiam_dask.instances.merge import segment_instances
from cryosiam_dask.instances.reference import from_original_kwargs, instance_segmentation
from cryosiam_dask.testing import strategies

PARAMS = dict(min_center_distance=1.0, max_center_distance=3.0, threshold_foreground=0.5, distance_type=1)


ball_maps = strategies.ball_maps
assert_equivalent_labeling = strategies.assert_same_partition


def run_chunked(fg, dist, chunks, halo, **params):
    with dask.config.set(scheduler="synchronous"):
        labels, report = segment_instances(
            da.from_array(fg, chunks=chunks), da.from_array(dist, chunks=chunks), halo=halo, **params
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
    chunks=strategies.chunkings(6, 12),
    halo=st.sampled_from([12, 16, 20]),
    distance_type=st.sampled_from([0, 1, 2]),
)
def test_property_chunked_equals_whole_volume(balls, chunks, halo, distance_type):
    fg, dist = ball_maps((16, 20, 18), balls)
    params = {**PARAMS, "distance_type": distance_type}
    out, report = check_against_reference(fg, dist, chunks, halo, params, require_exact=False)
    assert report.n_chunks == int(np.prod([-(-s // c) for s, c in zip(fg.shape, chunks, strict=True)]))


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


def test_rod_longer_than_halo_is_reported(caplog):
    shape = (16, 16, 48)
    grid = np.indices(shape)
    radial = np.sqrt((grid[0] - 8.0) ** 2 + (grid[1] - 8.0) ** 2)
    dist = np.clip(3.5 - radial, -5, 5).astype(np.float32)
    dist[..., :4] = -5  # the rod runs from x = 4 to 43
    dist[..., 44:] = -5
    fg = ndi.gaussian_filter((dist > 0).astype(np.float32), 1.0)
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask.instances.merge"):
        out, report = run_chunked(fg, dist, (16, 16, 8), 12, **PARAMS)
    assert report.oversized > 0
    assert report.oversized_chunks > 0
    assert "larger than the halo" in caplog.text
    # with a halo covering the rod it is exact again
    check_against_reference(fg, dist, (16, 16, 8), 48)


def test_running_twice_gives_the_same_result():
    fg, dist = ball_maps(LAYOUT, [(8, 8, 8, 3.5), (15, 16, 9, 3), (4, 20, 20, 2.5)])
    a, ra = run_chunked(fg, dist, CHUNKS, 16, **PARAMS)
    b, rb = run_chunked(fg, dist, CHUNKS, 16, **PARAMS)
    np.testing.assert_array_equal(a, b)
    assert ra == rb


def test_distributed_client(client):
    fg, dist = ball_maps(LAYOUT, [(8, 8, 8, 3.5), (15, 16, 9, 3), (4, 20, 20, 2.5)])
    labels, report = segment_instances(
        da.from_array(fg, chunks=CHUNKS), da.from_array(dist, chunks=CHUNKS), halo=16, **PARAMS
    )
    out = labels.compute()
    np.testing.assert_array_equal(out, instance_segmentation(fg, dist, **PARAMS))
    assert report.n_instances == int(out.max()) >= 3


def test_errors():
    a = da.zeros((10, 10, 10), chunks=5, dtype=np.float32)
    with pytest.raises(ConfigError, match="halo is 4 along axis z but must exceed 9"):
        segment_instances(a, a, halo=4, **PARAMS)
    with pytest.raises(ConfigError, match="halo must be an int >= 0 or three of them"):
        segment_instances(a, a, halo=(20, 20), **PARAMS)
    with pytest.raises(ConfigError, match="must be 3-d arrays of one shape"):
        segment_instances(a, a[:5], **PARAMS)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    from benchmarks.bench_instances import main

    rows = main(["--shape", "24", "32", "32", "--chunks", "16", "--halo", "14", "--out", str(tmp_path)])
    assert [r["run"] for r in rows] == ["in-memory reference", "chunked, 1 worker(s)", "chunked, 2 worker(s)"]
    assert (tmp_path / "bench_instances_24x32x32.json").is_file()
