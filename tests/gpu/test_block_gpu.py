"""The post-processing block functions on cupy against numpy: the same code, chosen by the array type.

Discrete results (labels, markers, keys, ids) must be identical; float results (the Gaussians, the EDT term)
within a few ulps (cupyx accumulates float32 filters in float32, scipy in float64). The flood watershed is
compared with skimage only on tie-free input: on ties it is documented not to be skimage's partition.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from cryosiam_dask.instances.block import (
    edt_block,
    final_maps,
    find_markers_with_levels,
    label_block,
    segment_block,
    smooth_block,
)
from cryosiam_dask.instances.memory_store import segment_instances
from cryosiam_dask.instances.params import PostParams
from cryosiam_dask.instances.watershed import flood_watershed, seeded_watershed
from cryosiam_dask.instances.windows import segment_window
from cryosiam_dask.testing.strategies import assert_same_partition, ball_maps

pytestmark = pytest.mark.gpu

PARAMS = dict(min_center_distance=1.0, max_center_distance=3.5, threshold_foreground=0.5, distance_type=1)


def _balls(rng: np.random.Generator, shape: tuple[int, int, int], n: int, apart: bool) -> list[tuple]:
    """Random balls (z, y, x, r); `apart`: no two within 3 voxels (one marker each, no contest)."""
    out: list[tuple] = []
    for _ in range(200):
        if len(out) == n:
            break
        c, r = rng.uniform(0, shape), float(rng.uniform(2.0, 4.5))
        gap = 3.0 if apart else -r  # touching / overlapping balls when not apart
        if all(np.linalg.norm(c - np.array(b[:3])) > r + b[3] + gap for b in out):
            out.append((*c, r))
    return out


def _maps(seed: int, shape=(24, 30, 28), n=8, apart=False, noise=True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fg, dist = ball_maps(shape, _balls(rng, shape, n, apart))
    if noise:  # tie-free maps: the flood and skimage agree, and no float comparison sits on a level
        dist = dist + (1e-4 * rng.standard_normal(shape)).astype(np.float32)
    return fg, dist


def _get(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def test_smooth_block(cp):
    a = np.random.default_rng(0).random((20, 23, 21), dtype=np.float32)
    out = smooth_block(cp.asarray(a))
    assert isinstance(out, cp.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out.get(), smooth_block(a), rtol=2e-6, atol=1e-7)


def test_edt_block(cp):
    mask = ndi.binary_opening(np.random.default_rng(1).random((20, 23, 21)) > 0.3)
    out = edt_block(cp.asarray(mask))
    assert isinstance(out, cp.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out.get(), edt_block(mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_label_block_identical(cp, seed):
    mask = np.random.default_rng(seed).random((18, 21, 20)) > 0.7
    labels, n = label_block(cp.asarray(mask))
    expected, n_expected = label_block(mask)
    assert n == n_expected
    np.testing.assert_array_equal(labels.get(), expected)  # raster numbering, as skimage.measure.label


@pytest.mark.parametrize("seed", range(4))
def test_find_markers_identical_on_the_same_distance(cp, seed):
    fg, dist = _maps(seed)
    mask, d = final_maps(fg, dist, threshold_foreground=0.5, distance_type=1)
    markers, level_of = find_markers_with_levels(cp.asarray(d), 1.0, 3.5)
    expected, expected_levels = find_markers_with_levels(d, 1.0, 3.5)
    np.testing.assert_array_equal(markers.get(), expected)
    np.testing.assert_array_equal(level_of.get(), expected_levels)


@pytest.mark.parametrize("seed", range(4))
def test_final_maps_masks_identical(cp, seed):
    fg, dist = _maps(seed)
    mask, d = final_maps(cp.asarray(fg), cp.asarray(dist), threshold_foreground=0.5, distance_type=1)
    mask_np, d_np = final_maps(fg, dist, threshold_foreground=0.5, distance_type=1)
    np.testing.assert_array_equal(mask.get(), mask_np)
    np.testing.assert_allclose(d.get(), d_np, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_flood_watershed_cupy_equals_numpy_even_on_ties(cp, seed):
    rng = np.random.default_rng(seed)
    shape = (10, 13, 12)
    image = rng.integers(0, 4, shape).astype(np.float64)  # plateaus: the flood's own tie order
    mask = rng.random(shape) > 0.2
    markers = np.zeros(shape, np.int64)
    markers.flat[rng.choice(image.size, 5, replace=False)] = np.arange(1, 6)
    try:
        expected = flood_watershed(image, markers, mask, max_passes=400)
    except RuntimeError:  # FloodNotConverged on numpy: the same must happen on cupy
        with pytest.raises(RuntimeError):
            flood_watershed(cp.asarray(image), cp.asarray(markers), cp.asarray(mask), max_passes=400)
        return
    out = flood_watershed(cp.asarray(image), cp.asarray(markers), cp.asarray(mask), max_passes=400)
    np.testing.assert_array_equal(out.get(), expected)


@pytest.mark.parametrize("seed", range(6))
def test_flood_watershed_cupy_equals_skimage_on_tie_free_input(cp, seed):
    """Documented: the flood gives skimage's partition (and ids) only where the relief has no ties."""
    rng = np.random.default_rng(50 + seed)
    shape = (12, 14, 13)
    image = rng.random(shape)
    mask = rng.random(shape) > 0.3
    markers = np.zeros(shape, np.int64)
    markers.flat[rng.choice(image.size, 6, replace=False)] = np.arange(1, 7)
    expected = watershed(image, markers, mask=mask, connectivity=1)
    out = flood_watershed(cp.asarray(image), cp.asarray(markers), cp.asarray(mask))
    np.testing.assert_array_equal(out.get(), expected)


def test_seeded_watershed_default_on_cupy_is_skimage_with_ties(cp):
    image = np.zeros((1, 1, 7))  # all ties: skimage's FIFO order decides
    markers = np.zeros((1, 1, 7), np.int64)
    markers[0, 0, 0], markers[0, 0, 6] = 1, 2
    mask = np.ones((1, 1, 7), bool)
    out = seeded_watershed(cp.asarray(image), cp.asarray(markers), cp.asarray(mask))
    assert isinstance(out, cp.ndarray)
    np.testing.assert_array_equal(out.get(), watershed(image, markers, mask=mask, connectivity=1))


@pytest.mark.parametrize("seed", range(3))
def test_segment_block_same_labels(cp, seed):
    fg, dist = _maps(seed, apart=False)
    out = segment_block(cp.asarray(fg), cp.asarray(dist), **PARAMS)
    expected = segment_block(fg, dist, **PARAMS)
    for name, a, b in zip(("labels", "markers", "level_of", "mask"), out[:4], expected[:4], strict=True):
        np.testing.assert_array_equal(_get(a), b, err_msg=name)


def _window_args(shape: tuple[int, int, int]) -> dict:
    z, y, x = shape
    core = (slice(4, z - 4), slice(5, y - 5), slice(3, x - 3))
    return dict(start=(10, 0, 7), core=core, cut=((True, False), (False, False), (False, True)),
                shape=(z + 30, y + 10, x + 20), params=PostParams(**PARAMS))


@pytest.mark.parametrize(("seed", "apart", "noise"), [(0, True, False), (1, True, False), (2, False, True),
                                                      (3, False, True), (4, False, True)])
def test_segment_window_identical(cp, seed, apart, noise):
    """Apart balls (plateaus allowed: no contested voxel) and touching balls on tie-free maps."""
    shape = (26, 32, 30)
    fg, dist = _maps(seed, shape=shape, n=10, apart=apart, noise=noise)
    kw = _window_args(shape)
    out = segment_window(cp.asarray(fg), cp.asarray(dist), **kw)
    expected = segment_window(fg, dist, **kw)
    assert isinstance(out.keys, cp.ndarray) and out.keys.dtype == np.uint64
    np.testing.assert_array_equal(out.keys.get(), expected.keys)
    np.testing.assert_array_equal(out.unique, expected.unique)
    assert out.skipped == expected.skipped
    np.testing.assert_array_equal(out.parts.flagged, expected.parts.flagged)
    assert_same_partition(out.keys.get(), expected.keys)


def test_segment_window_empty_window(cp):
    fg = np.zeros((12, 12, 12), np.float32)
    out = segment_window(cp.asarray(fg), cp.asarray(fg), **_window_args((12, 12, 12)))
    assert out.skipped and out.unique.size == 0 and isinstance(out.keys, cp.ndarray)


@pytest.mark.parametrize("chunks", [(12, 16, 14), (26, 32, 30)])
def test_segment_instances_cupy_chunks_equal_numpy(cp, chunks):
    shape = (26, 32, 30)
    fg, dist = _maps(7, shape=shape, n=12, apart=False, noise=True)
    with dask.config.set(scheduler="synchronous"):
        labels, report = segment_instances(
            da.from_array(cp.asarray(fg), chunks=chunks, asarray=False),
            da.from_array(cp.asarray(dist), chunks=chunks, asarray=False), PostParams(halo=16, **PARAMS))
        out = labels.compute()
        expected, e_report = segment_instances(
            da.from_array(fg, chunks=chunks), da.from_array(dist, chunks=chunks),
            PostParams(halo=16, **PARAMS))
        expected = expected.compute()
    assert isinstance(out, cp.ndarray) and out.dtype == np.uint32
    np.testing.assert_array_equal(out.get(), expected)
    assert report == e_report
