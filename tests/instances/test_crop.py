"""segment_crop: the crop's instances are the whole volume's partition there, for any crop and settings."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cryosiam_dask.errors import ParameterError
from cryosiam_dask.instances.crop import segment_crop
from cryosiam_dask.instances.params import PostParams
from cryosiam_dask.instances.reference import instance_segmentation
from cryosiam_dask.testing.strategies import assert_same_partition

SETTINGS = [
    dict(threshold_foreground=0.5, min_center_distance=1, max_center_distance=4, distance_type=1),
    dict(threshold_foreground=0.3, min_center_distance=0.5, max_center_distance=3, distance_type=0),
    dict(threshold_foreground=0.5, min_center_distance=1, max_center_distance=4, distance_type=2,
         postprocessing=True, boundary_bias=0.6),
]


def _random_crops(shape, n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        lo = [int(rng.integers(0, s - 8)) for s in shape]
        hi = [int(rng.integers(a + 4, min(s, a + 25) + 1)) for a, s in zip(lo, shape, strict=True)]
        yield tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_crop_equals_whole_volume_on_golden_maps(golden_maps, index):
    fg, dist, bnd = golden_maps
    kw = SETTINGS[index]
    whole = instance_segmentation(fg, dist, bnd, **kw)
    for crop in _random_crops(fg.shape, 8, seed=index):
        res = segment_crop(fg, dist, crop, PostParams(halo=12, **kw), boundary=bnd)
        assert res.exact
        assert res.labels.shape == whole[crop].shape and res.labels.dtype == np.uint32
        assert_same_partition(res.labels, whole[crop])
        assert res.n_instances == np.unique(whole[crop][whole[crop] > 0]).size


def _rod_and_balls():
    """A rod along x through the whole volume (longer than any halo) and a few balls."""
    fg = np.zeros((24, 40, 96), np.float32)
    fg[10:15, 18:23, 2:94] = 1
    for z, y, x in [(6, 8, 20), (16, 30, 60), (5, 32, 80)]:
        zz, yy, xx = np.ogrid[:24, :40, :96]
        fg[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 16] = 1
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    return fg, dist


def test_region_grows_over_components_longer_than_the_halo():
    fg, dist = _rod_and_balls()
    kw = dict(threshold_foreground=0.5, min_center_distance=1, max_center_distance=2, distance_type=0)
    whole = instance_segmentation(fg, dist, **kw)
    crop = (slice(8, 16), slice(16, 26), slice(40, 56))
    res = segment_crop(fg, dist, crop, PostParams(halo=6, **kw))
    assert res.exact and res.region[2] == slice(0, 96)  # grown along the rod to the volume's faces
    assert_same_partition(res.labels, whole[crop])
    small = segment_crop(fg, dist, crop, PostParams(halo=6, **kw), limit_bytes=160 * 20_000)
    assert not small.exact  # the rod's region would exceed the limit: reported, not silently wrong


def test_dask_maps_and_bad_crops():
    import dask.array as da

    fg, dist = _rod_and_balls()
    p = PostParams(threshold_foreground=0.5, min_center_distance=1, max_center_distance=2, halo=6)
    a = segment_crop(fg, dist, ((0, 12), (0, 20), (0, 30)), p)
    lazy = da.from_array(fg, chunks=8), da.from_array(dist, chunks=8)
    b = segment_crop(*lazy, ((0, 12), (0, 20), (0, 30)), p)
    np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(ParameterError, match="crop"):
        segment_crop(fg, dist, ((0, 0), (0, 20), (0, 30)), p)
    with pytest.raises(ParameterError, match="crop"):
        segment_crop(fg, dist, ((0, 12), (0, 20)), p)
    with pytest.raises(ParameterError, match="boundary"):
        segment_crop(fg, dist, ((0, 12), (0, 20), (0, 30)), PostParams(postprocessing=True, halo=6))
