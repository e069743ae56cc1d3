"""Tests of cryosiam_dask.outputs: CryoSiam's layouts, files read back with their own libraries, atomicity."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.measure import label as cc_label
from skimage.measure import regionprops_table

from cryosiam_dask import outputs
from cryosiam_dask.errors import NotSupportedError, OutputError

PROPS = ["label", "area", "bbox", "centroid"]


def _instances(shape=(30, 41, 37), seed=0, density=0.04) -> np.ndarray:
    """Random blobs labelled 1..N (uint32), some large enough to span several chunks, with empty regions."""
    rng = np.random.default_rng(seed)
    seeds = rng.random(shape) < density
    from scipy import ndimage

    grown = ndimage.binary_dilation(seeds, iterations=2)
    grown[:, :, : shape[2] // 3] = False  # an empty slab: whole empty chunks
    return cc_label(grown, connectivity=1).astype(np.uint32)


def _assert_table_equal(table, ref):
    assert list(table) == list(outputs.REGION_COLUMNS)
    for key in ref:
        assert table[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(table[key], ref[key], err_msg=key)


def _golden_instances(golden: Path) -> np.ndarray:
    with h5py.File(golden / "predictions" / "TS_tiny_instance_preds.h5", "r") as f:
        return f["instances"][:]


# ---------------------------------------------------------------------------------------- region table
@pytest.mark.parametrize("chunks", [(30, 41, 37), (8, 8, 8), (7, 13, 5), (1, 41, 37), (30, 3, 37)])
def test_region_table_equals_regionprops(chunks):
    lab = _instances()
    assert lab.max() > 5
    table = outputs.region_table(da.from_array(lab, chunks=chunks))
    _assert_table_equal(table, regionprops_table(lab, properties=PROPS))


def test_region_table_no_labels():
    lab = np.zeros((9, 10, 11), np.uint32)
    table = outputs.region_table(da.from_array(lab, chunks=4))
    _assert_table_equal(table, regionprops_table(lab, properties=PROPS))
    assert table["label"].size == 0


def test_region_table_non_consecutive_large_ids():
    lab = _instances(seed=3)
    offset = 4_000_000_000 - int(lab.max()) * 1000  # ids above 2**31, 1000 apart
    big = np.where(lab > 0, lab.astype(np.int64) * 1000 + offset, 0).astype(np.uint32)
    table = outputs.region_table(da.from_array(big, chunks=(6, 9, 10)))
    ref = regionprops_table(lab, properties=PROPS)  # skimage itself would allocate per id up to 4e9
    ref["label"] = ref["label"] * 1000 + offset
    assert table["label"].max() > 2**31
    _assert_table_equal(table, ref)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cz=st.integers(1, 20), cy=st.integers(1, 20), cx=st.integers(1, 20), seed=st.integers(0, 5))
def test_region_table_any_chunking(cz, cy, cx, seed):
    lab = _instances(shape=(16, 18, 20), seed=seed, density=0.03)
    table = outputs.region_table(da.from_array(lab, chunks=(cz, cy, cx)))
    _assert_table_equal(table, regionprops_table(lab, properties=PROPS))


def test_region_table_with_client(client, golden):
    lab = _golden_instances(golden)
    table = outputs.region_table(da.from_array(lab, chunks=(16, 20, 16)))
    _assert_table_equal(table, regionprops_table(lab, properties=PROPS))


# ---------------------------------------------------------------------------------------- CSV and HDF5
def test_regions_csv_reproduces_golden_bytes(golden, tmp_path):
    lab = _golden_instances(golden)
    table = outputs.region_table(da.from_array(lab, chunks=(16, 16, 16)))
    out = outputs.write_regions_csv(tmp_path / "TS_tiny_instance_regions.csv", table)
    expected = (golden / "predictions" / "TS_tiny_instance_regions.csv").read_bytes()
    assert expected.startswith(b"label,area,bbox-0,bbox-1,bbox-2,bbox-3,bbox-4,bbox-5,centroid-0,")
    assert out.read_bytes() == expected


def test_regions_csv_missing_column(tmp_path):
    with pytest.raises(ValueError, match="lacks columns"):
        outputs.write_regions_csv(tmp_path / "r.csv", {"label": np.arange(3)})
    assert not (tmp_path / "r.csv").exists()


def test_instances_h5_layout_matches_original(golden, tmp_path):
    lab = _golden_instances(golden)
    name = "TS_tiny_instance_preds.h5"
    out = outputs.write_instances_h5(tmp_path / name, da.from_array(lab, chunks=(7, 16, 9)))
    with h5py.File(out, "r") as ours, h5py.File(golden / "predictions" / name, "r") as orig:
        assert list(ours) == list(orig) == ["instances"]
        assert ours["instances"].dtype == orig["instances"].dtype == np.uint32
        assert ours["instances"].shape == orig["instances"].shape
        assert ours["instances"].compression == "gzip"
        np.testing.assert_array_equal(ours["instances"][:], orig["instances"][:])


def test_instances_h5_with_client_and_cast(client, tmp_path):
    lab = _instances().astype(np.int64)
    out = outputs.write_instances_h5(tmp_path / "i.h5", da.from_array(lab, chunks=(10, 10, 10)))
    with h5py.File(out, "r") as f:
        assert f["instances"].dtype == np.uint32
        np.testing.assert_array_equal(f["instances"][:], lab)


def test_instances_h5_rejects_out_of_range_ids(tmp_path):
    lab = np.zeros((4, 4, 4), np.int64)
    lab[1, 1, 1] = -3
    with pytest.raises(OutputError, match="uint32 range"):
        outputs.write_instances_h5(tmp_path / "i.h5", da.from_array(lab, chunks=2))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- raw predictions
def _maps(shape=(12, 14, 10)):
    rng = np.random.default_rng(1)
    return [rng.random(shape, dtype=np.float32) for _ in range(3)]


def test_raw_predictions_reused_only_if_fingerprint_matches(tmp_path, caplog):
    fp = {"checkpoint": ["/m/ck.ckpt", 123, 1.5], "min": 0.0, "tiling": "exact", "mask": None}
    maps = _maps()
    path = outputs.write_raw_predictions_h5(
        tmp_path / "TS_preds.h5", *[da.from_array(m, chunks=5) for m in maps], attrs=fp
    )
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["boundaries", "distances", "foreground"]
        assert all(f[n].dtype == np.float32 and f[n].shape == (12, 14, 10) for n in f)
        np.testing.assert_array_equal(f["distances"][:], maps[1])

    got = outputs.read_raw_predictions(path, dict(fp), shape=(12, 14, 10))
    assert got is not None
    for arr, ref in zip(got, maps, strict=True):
        np.testing.assert_array_equal(arr.compute(), ref)

    with caplog.at_level(logging.INFO, logger="cryosiam_dask.outputs.cryosiam"):
        assert outputs.read_raw_predictions(path, {**fp, "min": 0.1}) is None
        assert outputs.read_raw_predictions(path, fp, shape=(12, 14, 11)) is None
        assert outputs.read_raw_predictions(tmp_path / "missing_preds.h5", fp) is None
    assert "differ: min" in caplog.text
    assert "shape" in caplog.text
    assert "no raw predictions" in caplog.text


def test_raw_predictions_from_original_cryosiam_reused_with_warning(golden, caplog):
    path = golden / "predictions" / "TS_tiny_preds.h5"
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask.outputs.cryosiam"):
        got = outputs.read_raw_predictions(path, {"anything": 1}, shape=(40, 61, 44))
    assert got is not None
    assert "without settings fingerprint" in caplog.text
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(got[0].compute(), f["foreground"][:])
        np.testing.assert_array_equal(got[2].compute(), f["boundaries"][:])


def test_raw_predictions_missing_dataset_not_reused(tmp_path, caplog):
    path = tmp_path / "x_preds.h5"
    with h5py.File(path, "w") as f:
        f["foreground"] = np.zeros((2, 2, 2), np.float32)
    with caplog.at_level(logging.INFO, logger="cryosiam_dask.outputs.cryosiam"):
        assert outputs.read_raw_predictions(path, {}) is None
    assert "lacks datasets" in caplog.text


# -------------------------------------------------------------------------------------------- OME-Zarr
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reads_back_with_ome_zarr(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, Reader

    lab = _instances()
    tomo = np.random.default_rng(2).random(lab.shape, dtype=np.float32)
    out = outputs.write_ome_zarr(
        tmp_path / "TS.ome.zarr", da.from_array(tomo, chunks=8), da.from_array(lab, chunks=(8, 16, 16)),
        voxel_size=(10.0, 11.0, 12.0), maps={"foreground": da.from_array(tomo, chunks=8)}, levels=3,
        ngff_version=version,
    )
    nodes = {Path(str(n.zarr.path)).relative_to(out).as_posix(): n for n in Reader(parse_url(str(out)))()}
    image, instances = nodes["."], nodes["labels/instances"]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert any(isinstance(s, Labels) for s in nodes["labels"].specs)
    assert any(isinstance(s, Label) for s in instances.specs)
    for node in (image, instances):
        assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
        assert {a["unit"] for a in node.metadata["axes"]} == {"angstrom"}
        scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
        assert scales == [[10.0, 11.0, 12.0], [20.0, 22.0, 24.0], [40.0, 44.0, 48.0]]
    np.testing.assert_array_equal(np.asarray(instances.data[0]), lab)
    np.testing.assert_array_equal(np.asarray(instances.data[1]), lab[::2, ::2, ::2][:15, :20, :18])
    assert instances.data[1].dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(image.data[0]), tomo)
    coarse = tomo[:30, :40, :36].reshape(15, 2, 20, 2, 18, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(np.asarray(image.data[1]), coarse, rtol=1e-6)
    assert image.data[2].shape == instances.data[2].shape == (7, 10, 9)

    import zarr

    root = zarr.open_group(str(out), mode="r")
    attrs = dict(root["labels/instances"].attrs)
    attrs = attrs["ome"] if version == "0.5" else attrs
    assert attrs["image-label"]["source"] == {"image": "../../"}
    np.testing.assert_array_equal(root["maps/foreground/0"][:], tomo)
    assert root.metadata.zarr_format == (2 if version == "0.4" else 3)


def test_ome_zarr_and_h5_with_distributed_client(client, tmp_path):
    import zarr

    lab = _instances(shape=(12, 20, 18))
    labels = da.from_array(lab, chunks=(6, 8, 8))
    tomo = da.from_array(lab.astype(np.float32), chunks=(6, 8, 8))
    out = outputs.write_ome_zarr(tmp_path / "c.ome.zarr", tomo, labels, voxel_size=3.0, levels=2)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["labels/instances/0"][:], lab)
    fg = tomo / 2
    h5 = outputs.write_raw_predictions_h5(tmp_path / "c_preds.h5", fg, tomo, fg, attrs={"k": 1})
    with h5py.File(h5, "r") as f:
        np.testing.assert_array_equal(f["distances"][:], lab.astype(np.float32))


def test_ome_zarr_replaces_existing_directory_and_checks_shapes(tmp_path):
    lab = da.from_array(_instances(shape=(8, 8, 8)), chunks=4)
    tomo = da.zeros((8, 8, 8), np.float32, chunks=4)
    path = tmp_path / "t.ome.zarr"
    path.mkdir()
    (path / "stale.txt").write_text("old")
    outputs.write_ome_zarr(path, tomo, lab, voxel_size=5.0, levels=1)
    assert not (path / "stale.txt").exists()
    with pytest.raises(ValueError, match="differs from tomogram shape"):
        outputs.write_ome_zarr(path, tomo[:4], lab, voxel_size=5.0)


# ------------------------------------------------------------------------------------------- MRC, STAR
def test_mrc_labels_read_back_uint16(tmp_path, golden):
    import mrcfile

    lab = _golden_instances(golden)
    out = outputs.write_mrc_labels(tmp_path / "TS_tiny_instances.mrc", da.from_array(lab, chunks=(8, 20, 16)),
                                   voxel_size=10.0)
    with mrcfile.open(out, permissive=False) as mrc:
        assert mrc.header.mode == 6
        assert mrc.data.shape == lab.shape
        np.testing.assert_array_equal(mrc.data, lab)
        assert tuple(float(v) for v in mrc.voxel_size.tolist()) == (10.0, 10.0, 10.0)
        assert float(mrc.header.dmax) == lab.max()
    with mrcfile.open(golden / "data" / "TS_tiny.mrc") as tomo:
        assert tomo.voxel_size.x == pytest.approx(10.0)
    assert mrcfile.validate(str(out), print_file=open(os.devnull, "w")) is True


def test_mrc_labels_float32_for_large_ids_and_limit(tmp_path):
    import mrcfile

    lab = _instances(shape=(6, 7, 8)).astype(np.uint32)
    lab[lab > 0] += 70_000
    out = outputs.write_mrc_labels(tmp_path / "big.mrc", da.from_array(lab, chunks=3),
                                   voxel_size=(4.0, 5.0, 6.0))
    with mrcfile.open(out) as mrc:
        assert mrc.header.mode == 2
        np.testing.assert_array_equal(mrc.data.astype(np.uint32), lab)
        assert (float(mrc.voxel_size.z), float(mrc.voxel_size.y), float(mrc.voxel_size.x)) == (4.0, 5.0, 6.0)
    lab[0, 0, 0] = 2**24
    with pytest.raises(NotSupportedError, match="ome.zarr"):
        outputs.write_mrc_labels(tmp_path / "huge.mrc", da.from_array(lab, chunks=3), voxel_size=1.0)
    assert not (tmp_path / "huge.mrc").exists()


def test_star_parses_and_matches_csv(golden, tmp_path):
    import pandas as pd
    import starfile

    lab = _golden_instances(golden)
    table = outputs.region_table(da.from_array(lab, chunks=16))
    out = outputs.write_star(tmp_path / "TS_tiny_instances.star", table, voxel_size=10.0,
                             tomogram_name="TS_tiny.mrc")
    star = starfile.read(out)
    csv = pd.read_csv(golden / "predictions" / "TS_tiny_instance_regions.csv")
    assert len(star) == len(csv) == 10
    np.testing.assert_allclose(star["rlnCoordinateX"], csv["centroid-2"], atol=1e-6)
    np.testing.assert_allclose(star["rlnCoordinateY"], csv["centroid-1"], atol=1e-6)
    np.testing.assert_allclose(star["rlnCoordinateZ"], csv["centroid-0"], atol=1e-6)
    np.testing.assert_array_equal(star["cryosiamInstanceId"], csv["label"])
    np.testing.assert_array_equal(star["cryosiamVolumeVoxels"], csv["area"])
    assert set(star["rlnMicrographName"]) == {"TS_tiny.mrc"}
    assert set(star["rlnImagePixelSize"]) == {10.0}


# --------------------------------------------------------------------------------------- atomic writes
def _failing_labels(shape=(16, 16, 16), chunks=4, fail_block=(3, 2, 1)):
    def block(x, block_info=None):
        if tuple(block_info[None]["chunk-location"]) == fail_block:
            raise RuntimeError("worker died")
        return np.ones_like(x, dtype=np.uint32)

    return da.zeros(shape, np.uint32, chunks=chunks).map_blocks(block, dtype=np.uint32)


@pytest.mark.parametrize("writer", ["h5", "mrc", "ome_zarr"])
def test_failure_mid_write_leaves_nothing(tmp_path, writer):
    labels = _failing_labels()
    calls = {
        "h5": lambda p: outputs.write_instances_h5(p, labels),
        "mrc": lambda p: outputs.write_mrc_labels(p, labels, voxel_size=1.0, max_label=1),
        "ome_zarr": lambda p: outputs.write_ome_zarr(p, da.zeros(labels.shape, chunks=4), labels,
                                                     voxel_size=1.0),
    }
    with pytest.raises(RuntimeError, match="worker died"):
        calls[writer](tmp_path / "out.file")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_complete_file(tmp_path):
    path = tmp_path / "x_instance_preds.h5"
    outputs.write_instances_h5(path, da.ones((4, 4, 4), np.uint32, chunks=2))
    with pytest.raises(RuntimeError):
        outputs.write_instances_h5(path, _failing_labels())
    with h5py.File(path, "r") as f:
        assert f["instances"].shape == (4, 4, 4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_not_writable_folder_is_one_line_output_error(tmp_path, monkeypatch):
    folder = tmp_path / "preds"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == folder else real_access(p, m))
    with pytest.raises(OutputError, match=f"prediction folder {folder} is not writable") as info:
        outputs.write_star(folder / "a.star", {c: np.zeros(0) for c in outputs.REGION_COLUMNS})
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder_real_permissions(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            outputs.write_instances_h5(folder / "i.h5", da.ones((2, 2, 2), np.uint32))
    finally:
        folder.chmod(0o700)


def test_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"prediction folder {blocker / 'sub'} cannot be created"):
        outputs.write_regions_csv(blocker / "sub" / "r.csv", {c: np.zeros(0) for c in outputs.REGION_COLUMNS})


def test_disk_full_names_file_and_removes_temporary(tmp_path):
    path = tmp_path / "TS_instance_preds.h5"
    with pytest.raises(OutputError, match=f"disk full while writing {path}"):
        with outputs.atomic_output(path) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_success_and_other_errors_pass_through(tmp_path):
    path = tmp_path / "f.txt"
    with outputs.atomic_output(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.txt.tmp-")
        tmp.write_text("done")
        assert not path.exists()
    assert path.read_text() == "done"
    with pytest.raises(KeyError):
        with outputs.atomic_output(path) as tmp:
            tmp.write_text("half")
            raise KeyError("boom")
    assert path.read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# -------------------------------------------------------------------------------------- bounded memory
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import dask, dask.array as da, numpy as np
    from cryosiam_dask import outputs
    dask.config.set(scheduler="threads", num_workers=2)
    shape, chunk, cell = (512, 512, 512), 128, 24
    def block(block_info=None):  # cubes of 21 voxels on a 24-voxel grid, ids unique in the volume
        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        z, y, xx = (c.astype(np.uint32) for c in np.ogrid[z0:z1, y0:y1, x0:x1])
        n = np.uint32(-(-shape[0] // cell))
        ids = 1 + (z // cell) * n * n + (y // cell) * n + (xx // cell)
        ids[((z % cell) <= 2) | ((y % cell) <= 2) | ((xx % cell) <= 2)] = 0
        return ids
    meta = np.empty((0, 0, 0), np.uint32)
    labels = da.map_blocks(block, chunks=((chunk,) * 4,) * 3, dtype=np.uint32, meta=meta)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    table = outputs.region_table(labels)
    outputs.write_instances_h5(sys.argv[1] + "/i.h5", labels)
    top = int(table["label"].max())
    outputs.write_mrc_labels(sys.argv[1] + "/i.mrc", labels, voxel_size=10.0, max_label=top)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024, "n": int(table["label"].size),
                      "area0": float(table["area"][0])}))
    """
)


@pytest.mark.slow
def test_peak_memory_bounded_for_volume_much_larger_than_a_chunk(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    volume_mb = 512**3 * 4 / 2**20
    assert result["n"] == 22**3 and result["area0"] == 21**3
    # measured about 145 MB above the post-import baseline (chunk 8 MB, 2 threads) for a 512 MB volume
    assert result["peak_mb"] - result["before_mb"] < 0.35 * volume_mb, result
    with h5py.File(tmp_path / "i.h5", "r") as f:
        assert f["instances"][100, 100, 100] == 1 + 4 * 22 * 22 + 4 * 22 + 4
