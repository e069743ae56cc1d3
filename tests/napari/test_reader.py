"""The reader opens each output of a run with the voxel size as scale and the origin as translation."""

from __future__ import annotations

import logging
import shutil

import h5py
import numpy as np
import pytest

from cryosiam_dask.napari.reader import geometry_of, napari_get_reader, output_kind

VOXEL = (10.0, 10.0, 10.0)  # the demo's MRC voxel size


@pytest.fixture(scope="module")
def outputs(demo_run):
    config, result = demo_run
    with h5py.File(result.outputs["instances_h5"], "r") as f:
        labels = f["instances"][:]
    return result, labels


def _as_array(data):
    return np.asarray((data[0] if isinstance(data, list) else data).compute())


def test_output_kinds():
    assert output_kind("a/TS_01.ome.zarr") == "ome-zarr"
    assert output_kind("TS_01_instance_preds.h5") == "instances-h5"
    assert output_kind("TS_01_preds.h5") == "preds-h5"
    assert output_kind("TS_01_instances.mrc") == "instances-mrc"
    assert output_kind("TS_01.mrc") is None and napari_get_reader("TS_01.mrc") is None
    assert napari_get_reader(["TS_01.mrc", "TS_01_preds.h5"]) is None


@pytest.mark.parametrize("kind", ["ome_zarr", "instances_h5", "mrc", "raw_h5"])
def test_each_output_opens_with_scale_and_translation(demo_run, outputs, kind):
    napari = pytest.importorskip("napari")
    from cryosiam_dask.io.mrc import check_tomogram

    config, _ = demo_run
    result, labels = outputs
    origin = check_tomogram(config.parent / "data" / "TS_01.mrc").origin
    assert any(origin)  # the fixture's non-zero header origin
    path = result.outputs[kind]
    layers = napari_get_reader(str(path))(str(path))
    types = [t for _, _, t in layers]
    expected = {"ome_zarr": ["image", "image", "image", "image", "labels"], "instances_h5": ["labels"],
                "mrc": ["labels"], "raw_h5": ["image", "image", "image"]}[kind]
    assert sorted(types) == sorted(expected)
    viewer = napari.components.ViewerModel()
    for data, kwargs, layer_type in layers:
        assert kwargs["scale"] == VOXEL and kwargs["translate"] == origin
        assert kwargs["metadata"]["geometry_from"] == "file"
        layer = getattr(viewer, f"add_{layer_type}")(data, **kwargs)
        np.testing.assert_allclose(layer.scale, VOXEL)
        np.testing.assert_allclose(layer.translate, origin)
        if layer_type == "labels":
            np.testing.assert_array_equal(_as_array(data), labels)  # the same instances in every format
    # the layers overlay the tomogram: world extent = origin .. origin + shape * voxel
    extent = viewer.layers[-1].extent.world
    np.testing.assert_allclose(extent[0], origin)
    np.testing.assert_allclose(extent[1] - extent[0], (np.array(labels.shape) - 1) * VOXEL)


def test_h5_without_geometry_takes_the_siblings_or_defaults(demo_run, tmp_path, caplog):
    _, result = demo_run
    bare = tmp_path / "TS_01_instance_preds.h5"
    with h5py.File(result.outputs["instances_h5"], "r") as src, h5py.File(bare, "w") as dst:
        dst["instances"] = src["instances"][:]  # as CryoSiam writes it: no attributes
    with caplog.at_level(logging.WARNING):
        (geometry, source) = geometry_of(bare)
    assert source == "default" and geometry == ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert "no voxel size" in caplog.text
    shutil.copy(result.outputs["mrc"], tmp_path / "TS_01_instances.mrc")
    geometry, source = geometry_of(bare)
    assert source == "TS_01_instances.mrc" and geometry[0] == VOXEL
    shutil.copytree(result.outputs["ome_zarr"], tmp_path / "TS_01.ome.zarr")
    assert geometry_of(bare)[1] == "TS_01.ome.zarr"


def test_manifest_commands_resolve():
    pytest.importorskip("npe2")
    from importlib import import_module
    from importlib.resources import files

    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(str(files("cryosiam_dask.napari") / "napari.yaml"))
    assert manifest.name == "cryosiam_dask"
    patterns = set(manifest.contributions.readers[0].filename_patterns)
    assert {"*.ome.zarr", "*_instance_preds.h5", "*_instances.mrc", "*_preds.h5"} <= patterns
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        if module.endswith(("tuning", "run_widget")):
            pytest.importorskip("magicgui")
        assert callable(getattr(import_module(module), name))
