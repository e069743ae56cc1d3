"""The tuning widget: the crop's instances are the whole run's partition there, for two settings (the second
with the multicut); the settings it writes load back and give the same instances on a whole run."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cryosiam_dask.testing.strategies import assert_same_partition

napari = pytest.importorskip("napari")
pytest.importorskip("magicgui")
# a Qt binding whose system libraries are missing raises ImportError: skip then too
pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)

CROP = ((4, 28), (10, 50), (12, 60))
SETTING_B = dict(threshold=0.6, min_distance=0.5, max_distance=3.0, distance_type=2, boundary_bias=0.6,
                 multicut=True)


def _whole(result) -> np.ndarray:
    with h5py.File(result.outputs["instances_h5"], "r") as f:
        return f["instances"][:]


def _widget(config, **kwargs):
    from cryosiam_dask.napari.tuning import TuningWidget

    viewer = napari.components.ViewerModel()
    widget = TuningWidget(viewer, **kwargs)
    widget.config.value = str(config)  # opens the config: its tomograms and settings
    widget.tomogram.value = "TS_01"
    widget.load()
    return viewer, widget


def _crop(widget, crop=CROP):
    widget.set_crop(crop)
    widget.update_crop()
    return widget.last


def test_crop_equals_the_whole_run_and_written_settings_reproduce_it(demo_run, tmp_path):
    from distributed import Client, LocalCluster

    from cryosiam_dask.config import load_config
    from cryosiam_dask.run.driver import instance_predict

    config, result = demo_run
    viewer, widget = _widget(config, run_async=False)
    assert widget.session.maps.source.name.startswith("maps-")  # the run's cached maps in work_dir
    image = viewer.layers["TS_01"]
    assert tuple(image.scale) == (10.0, 10.0, 10.0) and any(image.translate)
    assert widget.params() == load_config(config).post_params  # the config's settings are shown
    # setting A, the config's: the crop is the run's partition there
    a = _crop(widget)
    crop = tuple(slice(*c) for c in CROP)
    assert a.exact and a.n_instances > 3
    assert_same_partition(a.labels, _whole(result)[crop])
    layer = viewer.layers["crop instances"]
    np.testing.assert_allclose(layer.translate, np.asarray(image.translate) + [40, 100, 120])
    # setting B (multicut on), written to a copy of the config, run whole from that file
    for name, value in SETTING_B.items():
        with getattr(widget, name).changed.blocked():
            getattr(widget, name).value = value
    b = _crop(widget)
    assert b.multicut and b.exact
    out = tmp_path / "tuned.yaml"
    widget.out.value = str(out)
    assert widget.write_settings() == out
    tuned = load_config(out)
    assert tuned.post_params == widget.params()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            [whole_b] = instance_predict(tuned, client=client)
    assert whole_b.report.get("n_watershed_instances") is not None  # the whole run ran the multicut too
    assert_same_partition(b.labels, _whole(whole_b)[crop])


def test_live_update_in_a_thread_and_crop_from_a_rectangle(demo_run, qt_wait):
    config, _ = demo_run
    viewer, widget = _widget(config)  # run_async: napari's thread worker
    qt_wait(lambda: widget._worker is None and widget.last is not None)
    first = widget.last
    widget.threshold.value = 0.8  # live: a change recomputes the crop
    qt_wait(lambda: widget._worker is None and widget.last is not first)
    assert widget.last.labels.shape == tuple(b - a for a, b in widget.crop())
    shapes = viewer.layers["crop"]
    shapes.add_rectangles(np.array([[16, 20, 8], [16, 20, 40], [16, 44, 40], [16, 44, 8]]))
    widget.live.value = False
    widget.crop_from_shapes()
    assert widget.crop()[1:] == ((20, 45), (8, 41))
    assert widget.crop()[0] == (16 - widget.size[0].value // 2, 16 - widget.size[0].value // 2
                                + widget.size[0].value)


def test_write_keeps_comments_and_other_keys(tmp_path):
    from pathlib import Path

    from cryosiam_dask.config import load_config
    from cryosiam_dask.instances.params import PostParams
    from cryosiam_dask.napari.settings_file import write_post_settings

    original = (Path(__file__).resolve().parents[2] / "configs" / "config_instance.yaml").read_text()
    path = tmp_path / "config.yaml"
    path.write_text(original.replace("    postprocessing: False\n", ""))  # a key the file lacks is added
    params = PostParams(threshold_foreground=0.55, min_center_distance=1.5, max_center_distance=4.0,
                        distance_type=2, boundary_bias=0.7, postprocessing=True)
    write_post_settings(path, params)
    text = path.read_text()
    assert load_config(path).post_params == params
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=False) if a != b]
    assert all(a.split(":")[0] == b.split(":")[0] for a, b in changed)  # only values of the same keys
    assert "distance_type: 2   # 0 for using only predicted distances" in text  # comments kept
    assert "test_files: null" in text and "save_raw_predictions: False" in text  # spellings kept
    assert "    postprocessing: true\n" in text
