"""copick projects and OME-Zarr URLs through ``instance_predict``: the same instances as the MRC files.

A local copick project (two runs, one with a lamella segmentation) is segmented and read back through copick's
own API; a tomogram served as OME-Zarr by an HTTP server on localhost is segmented from its URL.
"""

from __future__ import annotations

import functools
import http.server
import threading

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

copick = pytest.importorskip("copick", reason="the copick extra is not installed")

from cryosiam_dask.config import load_config  # noqa: E402
from cryosiam_dask.demo import write_demo_inputs  # noqa: E402
from cryosiam_dask.run.driver import instance_predict  # noqa: E402
from cryosiam_dask.testing.copick_project import write_copick_project  # noqa: E402

RUNS = ("TS-01", "TS-02")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two demo tomograms as MRC (TS-01 with its lamella mask) and the same as a copick project."""
    folder = tmp_path_factory.mktemp("copick_inputs")
    configs = {}
    for seed, run in enumerate(RUNS):
        configs[run] = write_demo_inputs(folder / run, shape=(32, 64, 64), stem=run, seed=seed)
    with h5py.File(folder / "TS-01" / "lamella" / "TS-01_preds.h5", "r") as f:
        mask = f["labels"][:]
    project = write_copick_project(
        folder / "copick", {run: folder / run / "data" / f"{run}.mrc" for run in RUNS}, masks={"TS-01": mask}
    )
    return folder, configs, project


def _settings(cfg: dict, **extra) -> dict:
    cfg["cryosiam_dask"] = {**cfg.get("cryosiam_dask", {}), "dashboard_address": None,
                            "output_formats": ["cryosiam"], **extra}
    return cfg


@pytest.fixture(scope="module")
def mrc_results(inputs):
    """Each run segmented from its MRC file (TS-01 with its mask folder, TS-02 without)."""
    folder, configs, _ = inputs
    out = {}
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, Client(cluster) as client:
        for run in RUNS:
            cfg = _settings(yaml.safe_load(configs[run].read_text()))
            if run != "TS-01":
                cfg.pop("mask_folder")
            path = folder / run / "mrc.yaml"
            path.write_text(yaml.safe_dump(cfg))
            [result] = instance_predict(load_config(path), client=client)
            with h5py.File(result.outputs["instances_h5"], "r") as f:
                labels = f["instances"][:]
            table = pd.read_csv(result.outputs["regions_csv"])
            out[run] = (labels, table)
    return out


def _copick_config(inputs, tmp_path, **copick_keys) -> dict:
    folder, configs, project = inputs
    cfg = yaml.safe_load(configs["TS-01"].read_text())
    for key in ("data_folder", "mask_folder", "test_files", "file_extension"):
        cfg.pop(key)
    cfg["prediction_folder"] = str(tmp_path / "predictions")
    keys = {"config": str(project), "voxel_spacing": 10.0, "tomo_type": "denoised", "object_name": "particle",
            "lamella_segmentation": "lamella", **copick_keys}
    return _settings(cfg, copick=keys)


def test_copick_project_gives_the_mrc_instances_back_through_copick(inputs, mrc_results, tmp_path, client):
    path = tmp_path / "copick.yaml"
    path.write_text(yaml.safe_dump(_copick_config(inputs, tmp_path)))
    results = instance_predict(load_config(path), client=client)
    assert [r.stem for r in results] == list(RUNS)
    root = copick.from_file(str(inputs[2]))
    for run_name in RUNS:
        labels, table = mrc_results[run_name]
        assert labels.max() > 0
        run = root.get_run(run_name)
        [seg] = run.get_segmentations(name="particle", user_id="cryosiam-dask", session_id="0",
                                      is_instance=True)
        assert seg.voxel_size == 10.0
        np.testing.assert_array_equal(seg.numpy(), labels)  # ids included
        [picks] = run.get_picks(object_name="particle", user_id="cryosiam-dask", session_id="0")
        points, _ = picks.numpy()
        expected = table[["centroid-2", "centroid-1", "centroid-0"]].to_numpy() * 10.0  # x, y, z in Å
        np.testing.assert_allclose(points, expected, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(picks.instance_ids(), table["label"].to_numpy())
        # the usual CryoSiam outputs too, under the run's name
        with h5py.File(tmp_path / "predictions" / f"{run_name}_instance_preds.h5", "r") as f:
            np.testing.assert_array_equal(f["instances"][:], labels)


def test_rerun_replaces_only_our_own_segmentation_and_picks(inputs, tmp_path, client):
    root = copick.from_file(str(inputs[2]))
    run = root.get_run("TS-02")
    theirs = run.new_segmentation(10.0, "particle", "7", user_id="alice", is_instance=True, exist_ok=True)
    theirs.from_numpy(np.full((32, 64, 64), 3, np.uint16))
    their_picks = run.new_picks("particle", "7", user_id="alice", exist_ok=True)
    their_picks.from_numpy(np.array([[1.0, 2.0, 3.0]]), instance_ids=np.array([5]))
    path = tmp_path / "copick.yaml"
    cfg = _copick_config(inputs, tmp_path, runs=["TS-02"], lamella_segmentation=None)
    path.write_text(yaml.safe_dump(cfg))
    for _ in range(2):
        instance_predict(load_config(path), client=client)
    root = copick.from_file(str(inputs[2]))
    run = root.get_run("TS-02")
    ours = run.get_segmentations(name="particle", user_id="cryosiam-dask", is_instance=True)
    assert len(ours) == 1
    [kept] = run.get_segmentations(name="particle", user_id="alice", is_instance=True)
    assert (kept.numpy() == 3).all()
    [kept_picks] = run.get_picks(object_name="particle", user_id="alice")
    np.testing.assert_array_equal(kept_picks.numpy()[0], [[1.0, 2.0, 3.0]])
    assert len(run.get_picks(object_name="particle", user_id="cryosiam-dask")) == 1


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def http_folder(tmp_path):
    """An HTTP server on localhost serving `tmp_path / "served"`; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_ome_zarr_url_gives_the_local_file_instances(inputs, mrc_results, http_folder, tmp_path, client):
    pytest.importorskip("aiohttp", reason="fsspec's http needs aiohttp (the copick extra)")
    import mrcfile

    from cryosiam_dask.outputs import write_ome_zarr

    folder, configs, _ = inputs
    served, base = http_folder
    with mrcfile.open(folder / "TS-02" / "data" / "TS-02.mrc", permissive=True) as f:
        volume = np.asarray(f.data)
    import dask.array as da

    # NGFF 0.4 / zarr v2, as the CZ cryoET Data Portal serves its tomograms
    tomogram = da.from_array(volume, chunks=(16, 32, 32))
    write_ome_zarr(served / "TS-02.zarr", tomogram, da.zeros_like(tomogram, dtype=np.uint32),
                   voxel_size=10.0, ngff_version="0.4")
    cfg = yaml.safe_load(configs["TS-02"].read_text())
    for key in ("data_folder", "mask_folder"):
        cfg.pop(key)
    cfg["test_files"] = [f"{base}/TS-02.zarr"]
    cfg["prediction_folder"] = str(tmp_path / "predictions")
    path = tmp_path / "url.yaml"
    path.write_text(yaml.safe_dump(_settings(cfg)))
    [result] = instance_predict(load_config(path), client=client)
    assert result.stem == "TS-02"
    with h5py.File(result.outputs["instances_h5"], "r") as f:
        np.testing.assert_array_equal(f["instances"][:], mrc_results["TS-02"][0])
