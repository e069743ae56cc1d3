"""The tuning session opens the tomograms as the run takes them: files, and copick runs read in place."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

pytest.importorskip("copick", reason="the copick extra is not installed")


def test_session_opens_a_copick_run_with_its_voxel_size(tmp_path, tiny_checkpoint):
    from cryosiam_dask.napari.session import TuningSession
    from cryosiam_dask.testing.copick_project import write_copick_project
    from cryosiam_dask.testing.synthetic import write_mrc

    volume = np.random.default_rng(0).random((8, 16, 24), dtype=np.float32)
    project = write_copick_project(tmp_path / "copick", {"TS-01": write_mrc(tmp_path / "a.mrc", volume)},
                                   voxel_size=12.5)
    cfg = {
        "prediction_folder": str(tmp_path / "out"), "trained_model": str(tiny_checkpoint),
        "save_raw_predictions": False, "hyper_parameters": {"batch_size": 1},
        "parameters": {"data": {"min": 0, "max": 1, "mean": 0, "std": 1},
                       "network": {"threshold_foreground": 0.5, "boundary_bias": 0.8,
                                   "min_center_distance": 1, "max_center_distance": 4, "distance_type": 1}},
        "cryosiam_dask": {"copick": {"config": str(project), "voxel_spacing": 12.5, "tomo_type": "denoised",
                                     "object_name": "particle"}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    session = TuningSession(path)
    assert list(session.tomograms()) == ["TS-01"]
    data, kwargs = session.tomogram_layer("TS-01")
    assert kwargs["scale"] == (12.5, 12.5, 12.5) and kwargs["translate"] == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(data.compute(), volume)
