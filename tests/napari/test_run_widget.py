"""The run widget runs instance_predict in a thread, shows the dashboard and progress, loads the result."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("magicgui")
# a Qt binding whose system libraries are missing raises ImportError: skip then too
pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)


def test_run_widget_runs_the_config_and_loads_each_result(tmp_path, qt_wait, request):
    from cryosiam_dask.napari.run_widget import RunWidget

    demo_config = request.getfixturevalue("demo_config_factory")
    config = demo_config(tmp_path / "demo", dashboard_address="127.0.0.1:0", output_formats=["cryosiam"])
    viewer = napari.components.ViewerModel()
    widget = RunWidget(viewer, processes=False)
    widget.config.value = str(config)
    widget.start()
    qt_wait(lambda: not widget.running, timeout=300)
    assert widget.error is None, widget.error
    assert widget.dashboard.value.startswith("http://") and widget.dashboard.value.endswith("/status")
    assert widget.progress.max == 1 and widget.progress.value == 1
    assert "TS_01 done:" in widget.log.value and "finished: 1 of 1" in widget.log.value
    [result] = widget.results
    layer = viewer.layers["TS_01 instances"]
    with h5py.File(result.outputs["instances_h5"], "r") as f:
        np.testing.assert_array_equal(np.asarray(layer.data), f["instances"][:])
    assert tuple(layer.scale) == (10.0, 10.0, 10.0) and any(layer.translate)


def test_run_widget_reports_a_bad_config(tmp_path):
    from cryosiam_dask.napari.run_widget import RunWidget

    bad = tmp_path / "bad.yaml"
    bad.write_text("data_folder: x\n")
    widget = RunWidget(napari.components.ViewerModel(), processes=False)
    widget.config.value = str(bad)
    widget.start()
    assert not widget.running and "bad.yaml" in widget.log.value
