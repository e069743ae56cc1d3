"""End to end: ``instance_predict`` on the golden case against the outputs of the original CryoSiam code."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from cryosiam_dask.config import load_config
from cryosiam_dask.errors import NotSupportedError


def _golden_config(golden: Path, tmp_path: Path, name: str = "config_instance.yaml", **ours) -> Path:
    """Copy the golden inputs next to a copy of its config whose prediction_folder is new."""
    for sub in ("data", "lamella", "lamella_resized", "model"):
        shutil.copytree(golden / sub, tmp_path / sub)
    cfg = yaml.safe_load((golden / name).read_text())
    cfg["prediction_folder"] = "out"
    if ours:
        cfg["cryosiam_dask"] = ours
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][...]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """One-to-one voxel mapping between the labels of ``a`` and ``b`` (ids may differ), same background."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("chunks", [[16, 24, 20], [40, 61, 44], [24, 40, 16]])
def test_exact_end_to_end_equals_cryosiam(golden, tmp_path, monkeypatch, client, chunks):
    cfg_path = _golden_config(
        golden, tmp_path, tiling="exact", chunk_size=chunks, halo=24, output_formats=["cryosiam"]
    )
    monkeypatch.chdir(tmp_path)
    results = __import__("cryosiam_dask.run.driver", fromlist=["x"]).instance_predict(
        load_config(cfg_path), client=client
    )
    out = tmp_path / "out"
    for ours, theirs in (
        ("foreground", "foreground"),
        ("distances", "distances"),
        ("boundaries", "boundaries"),
    ):
        a = _read(out / "TS_tiny_preds.h5", ours)
        b = _read(golden / "predictions" / "TS_tiny_preds.h5", theirs)
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.abs(a - b).max() <= 2e-5, ours
    labels = _read(out / "TS_tiny_instance_preds.h5", "instances")
    expected = _read(golden / "predictions" / "TS_tiny_instance_preds.h5", "instances")
    assert labels.dtype == np.uint32
    assert _same_partition(labels, expected)
    assert np.array_equal(labels, expected)  # CryoSiam's marker id order is reproduced too
    assert results[0].n_instances == 10
    ours_csv = list(csv.reader((out / "TS_tiny_instance_regions.csv").open()))
    theirs_csv = list(csv.reader((golden / "predictions" / "TS_tiny_instance_regions.csv").open()))
    assert ours_csv[0] == theirs_csv[0]
    np.testing.assert_allclose(
        np.array(ours_csv[1:], float), np.array(theirs_csv[1:], float), rtol=0, atol=1e-9
    )
    logs = list(tmp_path.glob("cryosiam_dask_instance_predict_*.log"))
    assert logs and "instances" in logs[0].read_text()


def test_resized_mask_end_to_end(golden, tmp_path, monkeypatch, client):
    cfg_path = _golden_config(
        golden,
        tmp_path,
        "config_instance_resized_mask.yaml",
        tiling="exact",
        chunk_size=[20, 32, 24],
        output_formats=["cryosiam"],
    )
    monkeypatch.chdir(tmp_path)
    from cryosiam_dask.run.driver import instance_predict

    instance_predict(load_config(cfg_path), client=client)
    labels = _read(tmp_path / "out" / "TS_tiny_instance_preds.h5", "instances")
    expected = _read(golden / "resized_mask" / "TS_tiny_instance_preds.h5", "instances")
    assert _same_partition(labels, expected)
    fg = _read(tmp_path / "out" / "TS_tiny_preds.h5", "foreground")
    assert np.abs(fg - _read(golden / "resized_mask" / "TS_tiny_preds.h5", "foreground")).max() <= 1e-5


def test_raw_maps_of_cryosiam_are_reused(golden, tmp_path, monkeypatch, client):
    """Like CryoSiam, an existing <stem>_preds.h5 skips the network; the instances follow from it."""
    cfg_path = _golden_config(golden, tmp_path, output_formats=["cryosiam"])
    (tmp_path / "out").mkdir()
    shutil.copy(golden / "predictions" / "TS_tiny_preds.h5", tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    from cryosiam_dask.run import maps as maps_stage
    from cryosiam_dask.run.driver import instance_predict

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran although the raw maps exist")

    monkeypatch.setattr(maps_stage, "plan_inference", no_network)
    instance_predict(load_config(cfg_path), client=client)
    labels = _read(tmp_path / "out" / "TS_tiny_instance_preds.h5", "instances")
    assert np.array_equal(labels, _read(golden / "predictions" / "TS_tiny_instance_preds.h5", "instances"))


@pytest.mark.parametrize("chunks", [[40, 61, 44], [16, 24, 20]])
def test_config_without_postprocessing_key_runs_the_multicut(golden, tmp_path, monkeypatch, client, chunks):
    """CryoSiam's default (no key: True): its multicut golden, at two chunkings, from CryoSiam's own maps."""
    cfg_path = _golden_config(golden, tmp_path, chunk_size=chunks, halo=24, output_formats=["cryosiam"])
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["parameters"]["network"]["postprocessing"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "out").mkdir()
    shutil.copy(golden / "predictions" / "TS_tiny_preds.h5", tmp_path / "out")  # the maps CryoSiam used
    monkeypatch.chdir(tmp_path)
    from cryosiam_dask.run.driver import instance_predict

    [result] = instance_predict(load_config(cfg_path), client=client)
    labels = _read(tmp_path / "out" / "TS_tiny_instance_preds.h5", "instances")
    expected = _read(golden / "postprocessing" / "multicut_a_default.h5", "instances")
    assert np.array_equal(labels, expected)  # partition and ids
    assert result.n_instances == 9 and result.report["n_watershed_instances"] == 10


def test_multicut_without_its_extra_fails_before_any_work(golden, tmp_path, monkeypatch):
    cfg_path = _golden_config(golden, tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["parameters"]["network"]["postprocessing"]  # CryoSiam's default is then True
    cfg_path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "bioimage_cpp", None)  # as if not installed
    from cryosiam_dask.run.driver import instance_predict

    with pytest.raises(NotSupportedError, match=r"pip install bioimage-cpp") as e:
        instance_predict(load_config(cfg_path))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
