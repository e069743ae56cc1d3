"""copick and URL inputs: the config's choice checked against the project before any work, one line each."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import yaml

from cryosiam_dask.config import load_config
from cryosiam_dask.errors import ConfigError, InputFileError
from cryosiam_dask.io.remote import ZarrUrl, url_stem

pytest.importorskip("copick", reason="the copick extra is not installed")

from cryosiam_dask.io.copick import CopickTomogram  # noqa: E402
from cryosiam_dask.testing.copick_project import write_copick_project  # noqa: E402
from cryosiam_dask.testing.synthetic import write_mrc  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("copick_io")
    volume = np.random.default_rng(0).random((8, 16, 16), dtype=np.float32)
    mrcs = {run: write_mrc(folder / f"{run}.mrc", volume, voxel_size=10.0) for run in ("TS-01", "TS-02")}
    return write_copick_project(folder / "copick", mrcs, masks={"TS-01": np.ones((8, 16, 16))})


def _config(tmp_path, ckpt, **copick_keys):
    keys = {"config": "copick/copick_config.json", "voxel_spacing": 10.0, "tomo_type": "denoised",
            "object_name": "particle", **copick_keys}
    cfg = {
        "prediction_folder": str(tmp_path / "out"),
        "trained_model": str(ckpt),
        "save_raw_predictions": False,
        "parameters": {"data": {"min": 0, "max": 1, "mean": 0, "std": 1},
                       "network": {"threshold_foreground": 0.5, "boundary_bias": 0.8,
                                   "min_center_distance": 1, "max_center_distance": 4, "distance_type": 1}},
        "hyper_parameters": {"batch_size": 1},
        "cryosiam_dask": {"copick": keys},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def config(project, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(project.parent.parent)  # the config names the project relative to the working dir
    return lambda **keys: load_config(_config(tmp_path, tiny_checkpoint, **keys))


def test_copick_runs_are_references_with_the_run_as_stem(config):
    refs = config(lamella_segmentation="lamella").validate_paths()
    assert [r.stem for r in refs] == ["TS-01", "TS-02"]
    assert all(isinstance(r, CopickTomogram) for r in refs)
    assert refs[0].lamella is not None and refs[1].lamella is None  # TS-02 has none: unmasked, warned


CASES = [
    ({"runs": ["TS-09"]}, InputFileError,
     r"run\(s\) TS-09 not in copick project .* \(runs: TS-01, TS-02\)"),
    ({"voxel_spacing": 7.5}, InputFileError,
     r"copick.voxel_spacing: run 'TS-01' .* no voxel spacing 7.5 Å \(it has: 10\)"),
    ({"tomo_type": "wbp"}, InputFileError,
     r"copick.tomo_type: .* no tomogram 'wbp' .* \(it has: denoised\)"),
    ({"object_name": "ribosome"}, ConfigError,
     r"copick.object_name: 'ribosome' is not a pickable object .* \(objects: lamella, particle\)"),
    ({"lamella_segmentation": "lamela"}, InputFileError,
     r"no segmentation 'lamela' .* \(binary or multilabel; it has: lamella\)"),
]


@pytest.mark.parametrize(("keys", "error", "message"), CASES)
def test_a_missing_choice_names_what_the_project_has(config, keys, error, message):
    with pytest.raises(error, match=message):
        config(**keys).validate_paths()


def test_filename_is_one_run(config):
    [ref] = config().validate_paths("TS-02")
    assert ref.run == "TS-02"


def test_without_copick_installed_the_error_names_the_extra(config, monkeypatch):
    from cryosiam_dask.io import copick as ours

    ours._open_root.cache_clear()
    monkeypatch.setitem(sys.modules, "copick", None)  # import copick now raises ImportError
    with pytest.raises(ConfigError, match=r"needs copick 2.0 .*pip install 'cryosiam_dask\[copick\]'"):
        config().validate_paths()


def test_lamella_segmentation_is_read_as_a_mask(config):
    [ref] = config(lamella_segmentation="lamella", runs=["TS-01"]).validate_paths()
    reader = ref.mask_reader((8, 16, 16))
    assert reader[0:2, 0:4, 0:4].dtype == np.int8 and (reader[0:2, 0:4, 0:4] == 1).all()


def test_url_stems_and_missing_url(tmp_path):
    assert url_stem("s3://bucket/10000/TS_026/Tomograms/100/TS_026.zarr/") == "TS_026"
    assert url_stem("https://host/a/TS_1.ome.zarr") == "TS_1"
    with pytest.raises(InputFileError, match=r"^file://.*/nothing.zarr: not a readable zarr"):
        ZarrUrl(f"file://{tmp_path}/nothing.zarr").open_node()


def test_copick_leaves_the_root_logger_alone(project):
    """copick's modules call logging.basicConfig(force=True) at import; ours keep the root logger as is."""
    import importlib
    import logging

    from cryosiam_dask.io.copick import open_root

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    assert [r.name for r in open_root(project).runs] == ["TS-01", "TS-02"]
    for module in ("copick.impl.cryoet_data_portal", "copick.ops.export", "copick.util.portal"):
        importlib.import_module(module)  # imported lazily by copick; each calls get_logger at import
    assert (root.handlers[:], root.level) == before
