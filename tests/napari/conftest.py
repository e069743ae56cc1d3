"""A demo run shared by the plugin's tests, and a wait that lets Qt deliver the workers' signals."""

from __future__ import annotations

import time
from pathlib import Path

import mrcfile
import pytest
import yaml

ORIGIN = (120.0, 250.0, 330.0)  # (z, y, x) Å: non-zero, so that a wrong translation shows


def demo_config(folder: Path, **settings) -> Path:
    """The demo's inputs (32 x 64 x 64, stem TS_01) with a header origin, and its config adjusted."""
    from cryosiam_dask.demo import write_demo_inputs

    config = write_demo_inputs(folder, shape=(32, 64, 64), stem="TS_01")
    with mrcfile.open(folder / "data" / "TS_01.mrc", mode="r+") as mrc:
        mrc.header.origin = (ORIGIN[2], ORIGIN[1], ORIGIN[0])
    cfg = yaml.safe_load(config.read_text())
    cfg["cryosiam_dask"] = {"dashboard_address": None, "n_workers": 1, "threads_per_worker": 2,
                            "output_formats": ["cryosiam", "raw", "ome-zarr", "mrc"], **settings}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo run once with the config's settings: (config path, its TomogramResult)."""
    from distributed import Client, LocalCluster

    from cryosiam_dask.config import load_config
    from cryosiam_dask.run.driver import instance_predict

    config = demo_config(tmp_path_factory.mktemp("napari_demo"))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            [result] = instance_predict(load_config(config), client=client)
    return config, result


def wait_until(condition, timeout: float = 120.0) -> None:
    """Process Qt events until `condition()` is true (the workers' signals arrive through the event loop)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"condition not met within {timeout} s")
        QApplication.processEvents()
        time.sleep(0.02)


@pytest.fixture
def qt_wait():
    """:func:`wait_until` (a fixture, since test modules do not import the conftest)."""
    pytest.importorskip("qtpy")
    return wait_until


@pytest.fixture
def demo_config_factory():
    """:func:`demo_config`, for a test that needs its own demo folder."""
    return demo_config
