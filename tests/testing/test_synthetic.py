"""Tests of cryosiam_dask.synthetic: synthetic tomograms, their ground truth and the file writers."""

from __future__ import annotations

import h5py
import mrcfile
import numpy as np
import pytest
from scipy import ndimage as ndi

from cryosiam_dask.testing.synthetic import make_large_mrc, make_tomogram, write_mask_h5, write_mrc


def _touching_label_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different non-zero labels that share a face (6-connectivity)."""
    pairs = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)[:-1].ravel()
        b = np.moveaxis(labels, axis, 0)[1:].ravel()
        keep = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[keep].tolist(), b[keep].tolist(), strict=True)}
    return pairs


def test_make_tomogram_properties():
    syn = make_tomogram((48, 64, 72), n_particles=15, radii=(3, 6), seed=1, touching_pairs=3, lamella=(8, 40))
    assert syn.tomogram.shape == syn.labels.shape == syn.mask.shape == (48, 64, 72)
    assert syn.tomogram.dtype == np.float32 and syn.labels.dtype == np.uint32 and syn.mask.dtype == np.uint8
    assert 0.0 <= syn.tomogram.min() and syn.tomogram.max() <= 1.0
    assert np.array_equal(np.unique(syn.labels), np.arange(16))  # 0 and 1..15, none lost
    assert syn.centers.shape == (15, 3) and syn.radii.shape == (15,)
    assert np.all((syn.radii >= 3) & (syn.radii <= 6))
    # particles bright on a dark background
    assert syn.tomogram[syn.labels > 0].mean() > syn.tomogram[syn.labels == 0].mean() + 0.2
    # each label contains the voxel nearest its centre (unless cut by the border)
    for i, c in enumerate(syn.centers):
        assert syn.labels[tuple(np.round(c).astype(int))] == i + 1
    assert np.array_equal(np.nonzero(syn.mask.any(axis=(1, 2)))[0], np.arange(8, 40))


def test_touching_pairs_touch_and_others_do_not():
    syn = make_tomogram((48, 64, 64), n_particles=12, seed=2, touching_pairs=2, noise=0.0)
    assert len(syn.touching) == 2
    for a, b in syn.touching:
        d = np.linalg.norm(syn.centers[a - 1] - syn.centers[b - 1])
        ratio = d / (syn.radii[a - 1] + syn.radii[b - 1])
        assert 0.6 <= ratio <= 0.85
    assert _touching_label_pairs(syn.labels) == {tuple(sorted(p)) for p in syn.touching}
    # without the touching pairs every particle is its own connected component
    _, n = ndi.label(syn.labels > 0)
    assert n == 12 - 2


def test_particles_on_planes_edges_and_corners():
    planes = [(0, 16), (2, 31.5), {0: 8, 1: 48}, {0: 24, 1: 16, 2: 48}]
    syn = make_tomogram((32, 64, 64), n_particles=6, seed=3, touching_pairs=0, planes=planes)
    c = syn.centers
    assert c[0, 0] == 16 and c[1, 2] == 31.5
    assert tuple(c[2, :2]) == (8, 48) and tuple(c[3]) == (24, 16, 48)
    assert syn.labels.max() == 6


def test_make_tomogram_is_deterministic():
    a = make_tomogram((32, 40, 48), n_particles=8, seed=5)
    b = make_tomogram((32, 40, 48), n_particles=8, seed=5)
    c = make_tomogram((32, 40, 48), n_particles=8, seed=6)
    np.testing.assert_array_equal(a.tomogram, b.tomogram)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert a.mask is None


def test_crowded_volume_places_fewer(caplog):
    syn = make_tomogram((16, 16, 16), n_particles=50, radii=(5, 6), seed=0, touching_pairs=0)
    assert 0 < syn.labels.max() < 50
    assert "no room" in caplog.text


def test_write_mrc_round_trip(tmp_path):
    vol = make_tomogram((8, 10, 12), n_particles=2, seed=0).tomogram
    path = write_mrc(tmp_path / "TS.mrc", vol, voxel_size=(3.0, 2.0, 1.5), origin=(30.0, 20.0, 10.0))
    with mrcfile.open(path) as m:
        np.testing.assert_array_equal(m.data, vol)
        assert (float(m.voxel_size.z), float(m.voxel_size.y), float(m.voxel_size.x)) == (3.0, 2.0, 1.5)
        assert (float(m.header.origin.z), float(m.header.origin.x)) == (30.0, 10.0)
    gz = write_mrc(tmp_path / "TS.mrc.gz", vol.astype(np.int16))
    np.testing.assert_array_equal(mrcfile.read(gz), vol.astype(np.int16))


def test_write_mask_h5_like_cryosiam(tmp_path):
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3] = True
    path = write_mask_h5(tmp_path / "TS_preds.h5", mask)
    with h5py.File(path, "r") as f:
        ds = f["labels"]
        assert ds.dtype == np.uint8 and ds.compression == "gzip"
        np.testing.assert_array_equal(ds[()], mask.astype(np.uint8))


def test_make_large_mrc(tmp_path):
    a = make_large_mrc(tmp_path / "a.mrc", (10, 16, 24), seed=1, slab=3)
    b = make_large_mrc(tmp_path / "b.mrc", (10, 16, 24), seed=1, slab=3)
    with mrcfile.mmap(a) as ma, mrcfile.mmap(b) as mb:
        assert ma.data.shape == (10, 16, 24) and ma.data.dtype == np.float32
        np.testing.assert_array_equal(ma.data, mb.data)
        assert 0.0 <= ma.data.min() and ma.data.max() < 1.0
        assert np.unique(np.asarray(ma.data)).size > 3000
        assert float(ma.voxel_size.x) == 10.0


@pytest.mark.slow
def test_make_tomogram_benchmark_size():
    syn = make_tomogram((128, 256, 256), n_particles=150, seed=0)
    assert syn.labels.max() == 150
