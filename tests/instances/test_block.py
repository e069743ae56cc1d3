"""In-memory post-processing: CryoSiam's goldens, the marker rule, the array-level watershed."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from skimage.segmentation import watershed

from cryosiam_dask.errors import ConfigError
from cryosiam_dask.instances.block import (
    find_markers,
    find_markers_with_levels,
    marker_levels,
    segment_block,
)
from cryosiam_dask.instances.reference import from_original_kwargs, instance_segmentation
from cryosiam_dask.instances.watershed import FloodNotConverged, flood_watershed, seeded_watershed

SETTINGS = [
    "a_default",
    "b_distance_type0",
    "c_distance_type2",
    "d_min2_max2",
    "e_min0.5_max3.7",
    "f_T0.4_min1_max5",
]


@pytest.fixture(scope="module")
def maps(golden_maps):
    return golden_maps


def _golden_case(golden, name):
    entry = json.loads((golden / "postprocessing" / "settings.json").read_text())[name]
    with h5py.File(golden / "postprocessing" / entry["file"], "r") as f:
        return entry, f[entry["dataset"]][:]


@pytest.mark.parametrize("name", SETTINGS)
def test_golden_postprocessing_exact(golden, maps, name):
    entry, expected = _golden_case(golden, name)
    out = instance_segmentation(*maps, **from_original_kwargs(entry["kwargs"]))
    assert out.dtype == np.uint32
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)  # same voxels and same ids
    assert int(out.max()) == entry["instances"]


def test_golden_a_default_equals_instance_predict_output(golden, maps):
    entry, _ = _golden_case(golden, "a_default")
    with h5py.File(golden / "predictions" / "TS_tiny_instance_preds.h5", "r") as f:
        expected = f["instances"][:]
    kwargs = from_original_kwargs(entry["kwargs"])
    np.testing.assert_array_equal(instance_segmentation(*maps, **kwargs), expected)


def test_inputs_not_modified(golden, maps):
    entry, _ = _golden_case(golden, "f_T0.4_min1_max5")
    copies = [m.copy() for m in maps]
    instance_segmentation(*maps, **from_original_kwargs(entry["kwargs"]))
    for m, c in zip(maps, copies, strict=True):
        np.testing.assert_array_equal(m, c)


@pytest.mark.parametrize("name", ["multicut_a_default", "multicut_b_bias0.7", "multicut_c_T0.5_dt2"])
def test_golden_multicut_exact(golden, maps, golden_settings, name):
    """The whole path with postprocessing=True, from CryoSiam's maps: its multicut output, ids included."""
    entry = golden_settings[name]
    with h5py.File(golden / "postprocessing" / entry["file"], "r") as f:
        expected = f["instances"][:]
    out = instance_segmentation(*maps, **from_original_kwargs(entry["kwargs"]))
    assert out.dtype == np.uint32 and np.array_equal(out, expected)


def test_bad_shapes_and_options():
    a = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(ConfigError, match="foreground .* and distance .* must be 3-d arrays of one shape"):
        instance_segmentation(a, a[:3])
    with pytest.raises(ConfigError, match="min_center_distance must be a finite number"):
        instance_segmentation(a, a, min_center_distance=float("nan"))


# ---- the marker rule on hand-made distance maps -------------------------------------------------------


def _box(shape, lo, hi, value, out=None):
    out = np.zeros(shape, np.float64) if out is None else out
    out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value
    return out


def test_levels_are_numpy_arange():
    np.testing.assert_allclose(marker_levels(1, 4), [1.5, 2, 2.5, 3, 3.5, 4])
    np.testing.assert_allclose(marker_levels(0.5, 3.7), [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    assert marker_levels(2, 2).size == 0
    assert marker_levels(3, 1).size == 0


def test_markers_min_equals_max():
    shape = (5, 6, 12)
    d = _box(shape, (1, 1, 7), (3, 3, 10), 3.0)
    _box(shape, (2, 2, 1), (4, 4, 4), 2.5, out=d)  # raster-first voxel at z=1 belongs to the right box
    _box(shape, (1, 4, 1), (2, 5, 2), 1.0, out=d)  # below min: no marker
    expected = np.zeros(shape, np.int64)
    expected[1:3, 1:3, 7:10] = 1
    expected[2:4, 2:4, 1:4] = 2
    np.testing.assert_array_equal(find_markers(d, 2, 2), expected)


def test_markers_vanish_at_intermediate_level_and_ids_by_level():
    shape = (6, 6, 14)
    d = _box(shape, (1, 1, 1), (5, 5, 6), 1.0)  # B: plateau 1 with a core of 4, first in raster order
    _box(shape, (2, 2, 2), (4, 4, 4), 4.0, out=d)
    _box(shape, (1, 1, 8), (4, 4, 12), 2.0, out=d)  # A: vanishes at 2.5, taken with its extent at 2.0
    markers, level_of = find_markers_with_levels(d, 1, 3)
    expected = np.zeros(shape, np.int64)
    expected[1:4, 1:4, 8:12] = 1  # vanished first -> id 1 although it comes later in raster order
    expected[2:4, 2:4, 2:4] = 2  # survivor at the top level (3.0), with its extent there
    np.testing.assert_array_equal(markers, expected)
    levels = marker_levels(1, 3)
    assert levels[level_of[1]] == 2.5
    assert level_of[2] == len(levels)


def test_markers_split_component_is_not_a_seed():
    shape = (5, 5, 15)
    d = _box(shape, (1, 1, 1), (4, 4, 14), 1.5)  # one component at 1 and 1.5 ...
    _box(shape, (1, 1, 2), (4, 4, 6), 3.0, out=d)  # ... splitting at 2 into a peak of 3 ...
    _box(shape, (1, 1, 9), (4, 4, 13), 5.0, out=d)  # ... and a peak of 5
    expected = np.zeros(shape, np.int64)
    expected[1:4, 1:4, 2:6] = 1  # vanishes at 3.5, extent at 3.0
    expected[1:4, 1:4, 9:13] = 2  # survives at 4.0
    np.testing.assert_array_equal(find_markers(d, 1, 4), expected)


def test_markers_non_integer_levels_use_the_last_arange_value():
    shape = (4, 4, 12)
    d = _box(shape, (1, 1, 1), (3, 3, 4), 2.1)  # survives at the top level 2.0 (arange(1.0, 2.2, 0.5))
    _box(shape, (1, 1, 7), (3, 3, 10), 1.8, out=d)  # vanishes at 2.0 although 1.8 > max = 1.7
    expected = np.zeros(shape, np.int64)
    expected[1:3, 1:3, 7:10] = 1
    expected[1:3, 1:3, 1:4] = 2
    np.testing.assert_array_equal(find_markers(d, 0.5, 1.7), expected)


def test_markers_same_level_vanishing_keep_previous_raster_order():
    shape = (4, 8, 8)
    d = _box(shape, (1, 5, 1), (3, 7, 3), 1.2)  # later in raster order, vanishes at 1.5
    _box(shape, (1, 1, 5), (3, 3, 7), 1.3, out=d)  # first in raster order, vanishes at 1.5
    _box(shape, (1, 1, 1), (2, 2, 2), 2.0, out=d)  # survivor, id last
    expected = np.zeros(shape, np.int64)
    expected[1:3, 1:3, 5:7] = 1
    expected[1:3, 5:7, 1:3] = 2
    expected[1:2, 1:2, 1:2] = 3
    np.testing.assert_array_equal(find_markers(d, 1, 2), expected)


def test_markers_empty_arange_max_below_min():
    shape = (4, 4, 9)
    d = _box(shape, (1, 1, 1), (3, 3, 3), 1.0)
    _box(shape, (1, 1, 5), (3, 3, 8), 9.0, out=d)
    expected = np.zeros(shape, np.int64)
    expected[1:3, 1:3, 5:8] = 1
    np.testing.assert_array_equal(find_markers(d, 2, 1), expected)


def test_markers_no_voxel_above_min():
    assert not find_markers(np.zeros((3, 4, 5)), 1, 4).any()


# ---- the array-level watershed against skimage -------------------------------------------------------


def _spaced_seeds(rng, shape, n):
    """n single-voxel seeds, pairwise more than 2 apart (L1), so no voxel touches two markers."""
    points: list[np.ndarray] = []
    while len(points) < n:
        p = rng.integers(0, shape)
        if all(np.abs(p - q).sum() > 2 for q in points):
            points.append(p)
    markers = np.zeros(shape, np.int64)
    for i, p in enumerate(points, start=1):
        markers[tuple(p)] = i
    return markers


@pytest.mark.parametrize("seed", range(12))
def test_flood_watershed_equals_skimage_on_tie_free_input(seed):
    rng = np.random.default_rng(seed)
    shape = (10, 13, 12)
    image = rng.random(shape)
    mask = rng.random(shape) > 0.3
    markers = _spaced_seeds(rng, shape, int(rng.integers(2, 9)))
    expected = watershed(image, markers, mask=mask, connectivity=1)
    np.testing.assert_array_equal(flood_watershed(image, markers, mask), expected)


@pytest.mark.parametrize("seed", range(4))
def test_flood_watershed_blob_markers_and_smooth_relief(seed):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(100 + seed)
    shape = (14, 16, 15)
    image = ndi.gaussian_filter(rng.random(shape), 1.5) + 1e-9 * rng.random(shape)
    mask = ndi.gaussian_filter(rng.random(shape), 1.0) > 0.48
    markers, _ = ndi.label(image < np.quantile(image, 0.03))
    markers[~mask] = 0
    expected = watershed(image, markers, mask=mask, connectivity=1)
    np.testing.assert_array_equal(flood_watershed(image, markers, mask), expected)


def test_flood_watershed_on_golden_maps_same_partition(golden, maps):
    entry, expected = _golden_case(golden, "a_default")
    kwargs = from_original_kwargs(entry["kwargs"])
    kw = {k: v for k, v in kwargs.items() if k not in ("boundary_bias", "postprocessing")}
    _, markers, _, mask, dist = segment_block(maps[0], maps[1], **kw)
    out = flood_watershed(-dist.astype(np.float64), markers, mask)
    np.testing.assert_array_equal(out, expected)


def test_seeded_watershed_numpy_is_skimage_with_ties():
    image = np.zeros((1, 1, 7))  # all ties: skimage's FIFO order decides
    markers = np.zeros((1, 1, 7), np.int64)
    markers[0, 0, 0], markers[0, 0, 6] = 1, 2
    mask = np.ones((1, 1, 7), bool)
    np.testing.assert_array_equal(
        seeded_watershed(image, markers, mask), watershed(image, markers, mask=mask, connectivity=1)
    )


def _tie_heavy(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 12, 12)
    image = rng.integers(0, 3, shape).astype(np.float64)  # three levels: plateaus everywhere
    mask = rng.random(shape) < 0.9
    markers = np.zeros(shape, np.int64)
    markers.flat[rng.choice(image.size, 4, replace=False)] = np.arange(1, 5)
    return image, markers, mask


def test_flood_watershed_is_bounded_and_not_skimage_on_ties():
    """Why the default floods with skimage: on plateaus the flood differs or does not settle (bounded)."""
    outcomes = []
    for seed in range(6):
        image, markers, mask = _tie_heavy(seed)
        expected = watershed(image, markers, mask=mask, connectivity=1)
        try:
            flood = flood_watershed(image, markers, mask, max_passes=200)
            outcomes.append(bool(np.array_equal(flood, expected)))
        except FloodNotConverged:
            outcomes.append(None)
        np.testing.assert_array_equal(seeded_watershed(image, markers, mask), expected)  # the default
    assert outcomes.count(True) < len(outcomes)
    with pytest.raises(FloodNotConverged, match="did not settle in 1 passes"):
        flood_watershed(*_tie_heavy(0), max_passes=1)


def test_seeded_watershed_methods():
    image, markers, mask = _tie_heavy(1)
    rng = np.random.default_rng(3)
    smooth = rng.random(image.shape)  # tie-free: both methods agree
    np.testing.assert_array_equal(
        seeded_watershed(smooth, markers, mask, method="flood"), seeded_watershed(smooth, markers, mask)
    )
    with pytest.raises(ValueError, match="method must be"):
        seeded_watershed(image, markers, mask, method="fastest")


@pytest.mark.gpu
def test_cupy_block_path_matches_numpy(golden, maps):
    cp = pytest.importorskip("cupy")
    entry, expected = _golden_case(golden, "a_default")
    kwargs = from_original_kwargs(entry["kwargs"])
    kw = {k: v for k, v in kwargs.items() if k not in ("boundary_bias", "postprocessing")}
    labels = segment_block(cp.asarray(maps[0]), cp.asarray(maps[1]), **kw)[0]
    assert isinstance(labels, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(labels), expected)
