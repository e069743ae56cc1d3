"""Tests of cryosiam_dask.io: MRC -> OME-Zarr conversion, zarr inputs, validation and lamella masks."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import h5py
import mrcfile
import numpy as np
import pytest
import zarr
from skimage.transform import resize

from cryosiam_dask import io
from cryosiam_dask.errors import InputFileError
from cryosiam_dask.testing.synthetic import make_large_mrc, write_mask_h5, write_mrc


def _volume(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


# ---------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.int16, np.uint16, np.float16])
@pytest.mark.parametrize("chunks", [(4, 8, 16), (7, 5, 30), (64, 64, 64)])
def test_tomogram_to_zarr_equals_mrc(tmp_path, dtype, chunks):
    vol = _volume((11, 13, 17), dtype)
    src = write_mrc(tmp_path / "TS_01.mrc", vol)
    arr = io.tomogram_to_zarr(src, tmp_path / "out.zarr", chunk_size=chunks)
    assert arr.dtype == np.dtype(dtype)
    assert arr.shape == vol.shape
    assert arr.chunks == tuple(min(c, s) for c, s in zip(chunks, vol.shape, strict=True))
    np.testing.assert_array_equal(arr[...], vol)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_big_endian_mrc_is_stored_native(tmp_path):
    vol = _volume((5, 6, 7), np.float32).astype(">f4")
    with mrcfile.new(tmp_path / "TS_be.mrc") as m:
        m.set_data(vol)
    arr = io.tomogram_to_zarr(tmp_path / "TS_be.mrc", tmp_path / "TS_be.zarr", chunk_size=(2, 3, 4))
    assert arr.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(arr[...], vol)


def test_metadata_read_back_with_ome_zarr(tmp_path):
    ome_reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    src = write_mrc(tmp_path / "TS_01.mrc", _volume((6, 7, 8), np.float32), voxel_size=(12.0, 11.0, 10.0))
    with mrcfile.open(src, mode="r+") as m:
        m.header.origin = (100.0, 200.0, 300.0)  # x, y, z
    io.tomogram_to_zarr(src, tmp_path / "TS_01.zarr", chunk_size=(4, 4, 4))
    node = list(ome_reader.Reader(parse_url(str(tmp_path / "TS_01.zarr")))())[0]
    axes = node.metadata["axes"]
    assert [a["name"] for a in axes] == ["z", "y", "x"]
    assert {a["type"] for a in axes} == {"space"} and {a["unit"] for a in axes} == {"angstrom"}
    transforms = {t["type"]: t for t in node.metadata["coordinateTransformations"][0]}
    assert transforms["scale"]["scale"] == [12.0, 11.0, 10.0]
    assert transforms["translation"]["translation"] == [300.0, 200.0, 100.0]
    np.testing.assert_array_equal(np.asarray(node.data[0]), mrcfile.read(src))
    ours = zarr.open_group(tmp_path / "TS_01.zarr", mode="r").attrs["cryosiam_dask"]
    assert ours["source_size"] == src.stat().st_size
    assert ours["source_mtime_ns"] == src.stat().st_mtime_ns
    assert ours["dtype"] == "<f4"
    assert io.check_tomogram(src).voxel_size == (12.0, 11.0, 10.0)
    opened = io.open_tomogram(tmp_path / "TS_01.zarr", work_dir=tmp_path)
    assert (opened.voxel_size, opened.origin) == ((12.0, 11.0, 10.0), (300.0, 200.0, 100.0))


def test_compressed_mrc_is_read_whole(tmp_path):
    vol = _volume((5, 9, 6), np.int16)
    src = write_mrc(tmp_path / "TS_02.rec.gz", vol)
    tomo = io.open_tomogram(src, work_dir=tmp_path / "work", chunk_size=(2, 4, 4))
    assert tomo.stem == "TS_02"
    np.testing.assert_array_equal(tomo.data.compute(), vol)


# ---------------------------------------------------------------------------------------------- open_tomogram


def test_open_tomogram_converts_then_reuses(tmp_path, monkeypatch):
    vol = _volume((9, 10, 12), np.float32)
    src = write_mrc(tmp_path / "TS_01.mrc", vol, voxel_size=7.5)
    work = tmp_path / "work"
    tomo = io.open_tomogram(src, work_dir=work, chunk_size=(4, 5, 6))
    assert tomo.zarr_path == work / "TS_01.zarr"
    assert tomo.stem == "TS_01" and tomo.voxel_size == (7.5, 7.5, 7.5) and tomo.origin == (0.0, 0.0, 0.0)
    assert tomo.data.chunksize == (4, 5, 6) and tomo.data.dtype == np.float32
    np.testing.assert_array_equal(tomo.data.compute(), vol)
    pickle.dumps(tomo.data)  # must travel to distributed workers

    def fail(*args, **kwargs):
        raise AssertionError("converted again although the source did not change")

    monkeypatch.setattr(io, "tomogram_to_zarr", fail)
    again = io.open_tomogram(src, work_dir=work, chunk_size=(3, 3, 3))
    assert again.data.chunksize == (3, 3, 3)
    np.testing.assert_array_equal(again.data.compute(), vol)
    monkeypatch.undo()

    changed = vol + 1
    write_mrc(src, changed)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = io.open_tomogram(src, work_dir=work, chunk_size=(4, 5, 6))
    np.testing.assert_array_equal(third.data.compute(), changed)


def test_open_tomogram_zarr_in_place(tmp_path, client):
    vol = _volume((8, 9, 10), np.uint16)
    src = write_mrc(tmp_path / "TS_01.mrc", vol, voxel_size=(3.0, 2.0, 1.0))
    group = tmp_path / "TS_01.zarr"
    io.tomogram_to_zarr(src, group, chunk_size=(4, 4, 4))
    work = tmp_path / "work"
    tomo = io.open_tomogram(group, work_dir=work, chunk_size=(8, 3, 5))
    assert tomo.zarr_path == group and tomo.stem == "TS_01" and tomo.voxel_size == (3.0, 2.0, 1.0)
    assert not work.exists()
    np.testing.assert_array_equal(client.compute(tomo.data).result(), vol)

    plain = tmp_path / "plain.zarr"
    zarr.create_array(plain, data=vol[:, :, :7])
    tomo = io.open_tomogram(plain, work_dir=work, chunk_size=(4, 4, 4))
    assert tomo.zarr_path == plain and tomo.stem == "plain" and tomo.voxel_size == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(tomo.data.compute(), vol[:, :, :7])


def test_stem_of_follows_file_extension():
    assert io.stem_of("/a/TS_01.mrc") == "TS_01"
    assert io.stem_of("/a/TS_01.rec.bz2") == "TS_01"
    assert io.stem_of("/a/TS_01.zarr/") == "TS_01"
    assert io.stem_of("/a/TS_01.denoised.mrc", ".denoised.mrc") == "TS_01"
    assert io.stem_of("/a/TS_01_rec.mrc", "_rec.mrc") == "TS_01"


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_files(tmp_path):
    write_mrc(tmp_path / "ok.mrc", _volume((5, 6, 7), np.float32))
    data = (tmp_path / "ok.mrc").read_bytes()
    (tmp_path / "truncated.mrc").write_bytes(data[:-12])
    (tmp_path / "text.mrc").write_text("not an MRC file\n" * 100)
    (tmp_path / "tiny.mrc").write_bytes(b"MAP ")
    write_mrc(tmp_path / "flat.mrc", np.zeros((1, 64, 64), np.float32))
    with mrcfile.new(tmp_path / "complex.mrc") as m:
        m.set_data(np.zeros((3, 4, 4), np.complex64))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.mrc", r"missing\.mrc: tomogram file not found"),
        (
            "truncated.mrc",
            r"truncated\.mrc: truncated MRC file \(1852 bytes; header \(5, 6, 7\) float32 needs 1864",
        ),
        ("text.mrc", r"text\.mrc: not a valid MRC file \(map id"),  # a text file named .mrc
        ("tiny.mrc", r"tiny\.mrc: not a valid MRC file \("),
        ("flat.mrc", r"flat\.mrc: 2D image \(1, 64, 64\); a 3D tomogram is needed"),
        ("complex.mrc", r"complex\.mrc: unsupported MRC mode 4"),
    ],
)
def test_bad_tomograms_are_rejected(tmp_path, name, message):
    _bad_files(tmp_path)
    with pytest.raises(InputFileError, match=message) as err:
        io.open_tomogram(tmp_path / name, work_dir=tmp_path / "work")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "work" / f"{name[:-4]}.zarr").exists()


def test_bad_suffix_and_zarr_inputs(tmp_path):
    (tmp_path / "TS_01.tif").write_bytes(b"II*\x00")
    with pytest.raises(InputFileError, match=r"TS_01\.tif: unsupported tomogram suffix"):
        io.open_tomogram(tmp_path / "TS_01.tif", work_dir=tmp_path)
    with pytest.raises(InputFileError, match=r"none\.zarr: zarr input not found"):
        io.open_tomogram(tmp_path / "none.zarr", work_dir=tmp_path)
    zarr.create_array(tmp_path / "flat.zarr", data=np.zeros((4, 5), np.float32))
    with pytest.raises(InputFileError, match=r"flat\.zarr: array is 2D \(4, 5\); a 3D tomogram is needed"):
        io.open_tomogram(tmp_path / "flat.zarr", work_dir=tmp_path)
    zarr.open_group(tmp_path / "empty.zarr", mode="w")
    with pytest.raises(InputFileError, match=r"empty\.zarr: zarr group has no array '0'"):
        io.open_tomogram(tmp_path / "empty.zarr", work_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- masks


def test_read_mask_none():
    assert io.read_mask(None, "TS_01", (4, 4, 4)) is None
    assert io.read_mask("", "TS_01", (4, 4, 4)) is None


def test_read_mask_same_shape_is_lazy_and_picklable(golden, client):
    mask = io.read_mask(golden / "lamella", "TS_tiny", (40, 61, 44), chunks=(16, 32, 32))
    assert mask.dtype == np.int8 and mask.chunksize == (16, 32, 32)
    with h5py.File(golden / "lamella" / "TS_tiny_preds.h5", "r") as f:
        expected = f["labels"][()].astype(np.int8)
    pickle.loads(pickle.dumps(mask))
    np.testing.assert_array_equal(client.compute(mask).result(), expected)
    assert int(expected[6:34].min()) == 1 and int(expected.sum()) == 28 * 61 * 44


def test_read_mask_keeps_factors_and_reads_mrc(tmp_path):
    values = np.zeros((6, 5, 4), np.uint8)
    values[2:4] = 2
    write_mask_h5(tmp_path / "TS_01_preds.h5", values)
    np.testing.assert_array_equal(
        io.read_mask(tmp_path, "TS_01", (6, 5, 4)).compute(), values.astype(np.int8)
    )
    write_mrc(tmp_path / "TS_02.mrc", values.astype(np.int8))
    np.testing.assert_array_equal(
        io.read_mask(tmp_path, "TS_02", (6, 5, 4), chunks=(2, 2, 2)).compute(), values
    )


def test_read_mask_errors(tmp_path):
    with pytest.raises(InputFileError, match=r"TS_01_preds\.h5: lamella mask not found"):
        io.read_mask(tmp_path, "TS_01", (4, 4, 4))
    write_mask_h5(tmp_path / "TS_02_preds.h5", np.ones((61, 44), np.uint8))
    message = r"mask .*TS_02_preds\.h5 is 2D \(61, 44\) but tomogram is 3D \(40, 61, 44\)"
    with pytest.raises(InputFileError, match=message):
        io.read_mask(tmp_path, "TS_02", (40, 61, 44))
    with h5py.File(tmp_path / "TS_03_preds.h5", "w") as f:
        f["preds"] = np.ones((2, 2, 2))
    with pytest.raises(InputFileError, match=r"TS_03_preds\.h5: mask file has no dataset 'labels'"):
        io.read_mask(tmp_path, "TS_03", (2, 2, 2))


@pytest.mark.parametrize("chunks", [(40, 61, 44), (16, 16, 16), (7, 9, 11), (1, 61, 5)])
def test_golden_resized_mask(golden, chunks):
    mask = io.read_mask(golden / "lamella_resized", "TS_tiny", (40, 61, 44), chunks=chunks)
    with h5py.File(golden / "lamella_resized" / "TS_tiny_preds.h5", "r") as f:
        small = f["labels"][()].astype(np.int8)
    whole = resize(small, (40, 61, 44), mode="constant", preserve_range=True).astype(np.int8)
    got = mask.compute()
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, whole)
    assert int(got.sum()) == 58000  # the golden README's count (0.9999999999999998 truncates to 0)
    nz = np.nonzero(got)
    assert [(int(a.min()), int(a.max())) for a in nz] == [(7, 34), (2, 59), (1, 42)]


@pytest.mark.parametrize("seed", range(12))
def test_resize_mask_blocks_equal_whole_array(seed):
    rng = np.random.default_rng(seed)
    src_shape = tuple(int(v) for v in rng.integers(3, 25, 3))
    out_shape = tuple(int(v) for v in rng.integers(3, 40, 3))
    small = (rng.random(src_shape) > rng.uniform(0.1, 0.6)).astype(np.int8)
    small[0, 0, 0] = 0
    chunks = tuple(int(v) for v in rng.integers(2, 17, 3))
    expected = resize(small, out_shape, mode="constant", preserve_range=True).astype(np.int8)
    np.testing.assert_array_equal(io.resize_mask(small, out_shape, chunks=chunks).compute(), expected)


def test_resize_mask_without_zero_uses_whole_array_path():
    small = np.ones((5, 6, 7), np.int8)
    for out_shape in [(10, 12, 14), (3, 4, 5), (5, 9, 3)]:
        expected = resize(small, out_shape, mode="constant", preserve_range=True).astype(np.int8)
        np.testing.assert_array_equal(io.resize_mask(small, out_shape, chunks=(2, 3, 4)).compute(), expected)


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_conversion_memory_is_bounded_by_a_slab(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    shape = (256, 512, 512)  # 256 MiB of float32
    src = make_large_mrc(tmp_path / "big.mrc", shape, seed=3, slab=16)
    make_large_mrc(tmp_path / "small.mrc", (20, 300, 300), seed=4)
    # Peak RSS of the child from /proc (VmHWM, reset after the imports): ru_maxrss would include the RSS that
    # a forked child inherits from this (large) pytest process.
    script = textwrap.dedent(
        f"""
        from cryosiam_dask.io.tomograms import tomogram_to_zarr

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key))

        warm_up = {str(tmp_path / "small.mrc")!r}
        tomogram_to_zarr(warm_up, warm_up[:-4] + ".zarr", chunk_size=(16, 256, 256))  # lazy imports, pools
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        base = status("VmRSS:")
        tomogram_to_zarr({str(src)!r}, {str(tmp_path / "big.zarr")!r}, chunk_size=(16, 256, 256))
        print(base, status("VmHWM:"))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base_kib, peak_kib = (int(v) for v in out.stdout.split())
    volume_kib = np.prod(shape) * 4 // 1024
    slab_kib = 16 * 512 * 512 * 4 // 1024
    print(f"conversion of {volume_kib // 1024} MiB: RSS {base_kib // 1024} -> peak {peak_kib // 1024} MiB")
    assert peak_kib - base_kib < volume_kib // 4, (base_kib, peak_kib, volume_kib)
    assert peak_kib - base_kib < 6 * slab_kib
    arr = zarr.open_array(tmp_path / "big.zarr" / "0", mode="r")
    with mrcfile.mmap(src, mode="r") as m:
        for z in (0, 17, 255):
            np.testing.assert_array_equal(arr[z], m.data[z])
