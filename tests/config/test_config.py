"""cryosiam_dask.config: CryoSiam's instance YAML, strict keys, one-line errors, file lists."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from cryosiam_dask.config import IGNORED_KEYS, DaskSettings, InstanceConfig, load_config
from cryosiam_dask.errors import ConfigError, InputFileError

# The docs' example (cryosiam-docs docs/instance.md), verbatim.
DOCS_CONFIG = """\
data_folder: '/scratch/stojanov/datatset1/predictions/denoised'
mask_folder: '/scratch/stojanov/datatset1/predictions/lamella'
log_dir: '/scratch/stojanov/datatset1/'
prediction_folder: '/scratch/stojanov/datatset1/predictions/instance'

trained_model: '/scratch/stojanov/trained_models/cryosiam_instance.ckpt'
file_extension: '.mrc'

test_files: null

save_raw_predictions: False

parameters:
  gpu_devices: 1
  data:
    patch_size: [ 128, 128, 128 ]
    min: 0
    max: 1
    mean: 0
    std: 1
  network:
    in_channels: 1
    spatial_dims: 3
    threshold_foreground: 0.65
    boundary_bias: 0.8
    min_center_distance: 1
    max_center_distance: 5
    distance_type: 1   # 0 for using only predicted distances, 1 for using predicted distances \
+ cdist from foreground, 2 for using only cdist
    postprocessing: False

hyper_parameters:
  batch_size: 10
"""

# apps/dense_simsiam_instance/config_predict.yaml (the repo's dev example), verbatim.
DEV_CONFIG = """\
data_folder: '/scratch/stojanov/mycoplasma_data/vpp/240422/'
instance_labels_folder: '/scratch/stojanov/mycoplasma_data/vpp/old/instance_labels/'
semantic_predictions: '/scratch/stojanov/mycoplasma_data/vpp/old/semantic_predictions/'
semantic_foreground_labels: [ 2 ]
mask_folder: ''
log_dir: '/scratch/stojanov/development/cryosiam/experiments/dense_simsiam_instance'
prediction_folder: '/scratch/stojanov/development/cryosiam/experiments/dense_simsiam_instance/predictions'
trained_model: '/scratch/stojanov/development/cryosiam/experiments/dense_simsiam_instance/model/\
model-best.ckpt'
file_extension: '.mrc'

test_files: [ 'TS_56_6.80Apx.mrc', 'TS_61_6.80Apx.mrc' ]

save_raw_predictions: False
eval_skip_prediction: False

filtering_mask_folder: '/g/zaugg/stojanov/simulated_datasets/final_models/dense_simsiam_instance/predictions/\
semantic'
filtering_mask_expand_voxels: 2
filtering_mask_labels: [1]
filtering_mask_extension: '.mrc' # it can be .h5 for a mask coming from CryoSiam prediction or .mrc/.rec

parameters:
  gpu_devices: 1
  data:
    patch_size: [ 64, 64, 64 ]
    min: 0
    max: 1
    mean: 0
    std: 1
  network:
    in_channels: 1
    spatial_dims: 3
    threshold_foreground: 0.4
    boundary_bias: 0.5
    min_center_distance: 0
    max_center_distance: 5
    distance_type: 1
    postprocessing: False

hyper_parameters:
  batch_size: 40
"""


def write_yaml(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path) -> dict:
    """A valid config (as a dict) whose folders and files exist under tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("TS_02.mrc", "TS_01.mrc", "notes.txt", "TS_03.rec"):
        (data / name).write_bytes(b"")
    (data / "sub.mrc").mkdir()  # a folder with the extension is not a tomogram
    (tmp_path / "lamella").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"")
    cfg = yaml.safe_load(DOCS_CONFIG)
    cfg.update(data_folder=str(data), mask_folder=str(tmp_path / "lamella"), log_dir=str(tmp_path),
               prediction_folder=str(tmp_path / "out"), trained_model=str(tmp_path / "model.ckpt"))
    return cfg


def load(tmp_path: Path, cfg: dict | str, overrides: dict | None = None) -> InstanceConfig:
    return load_config(write_yaml(tmp_path / "config.yaml", cfg), overrides)


# ---------------------------------------------------------------------------------------------- example files


def test_docs_config_loads_unchanged(tmp_path):
    cfg = load(tmp_path, DOCS_CONFIG)
    net = cfg.parameters.network
    assert (net.threshold_foreground, net.boundary_bias, net.min_center_distance) == (0.65, 0.8, 1.0)
    assert (net.max_center_distance, net.distance_type, net.postprocessing) == (5.0, 1, False)
    assert cfg.hyper_parameters.batch_size == 10
    assert cfg.parameters.data.patch_size == [128, 128, 128]
    assert cfg.mask_folder == Path("/scratch/stojanov/datatset1/predictions/lamella")
    assert cfg.checkpoint_path == Path("/scratch/stojanov/trained_models/cryosiam_instance.ckpt")
    assert cfg.test_files is None and cfg.save_raw_predictions is False
    assert cfg.cryosiam_dask == DaskSettings()
    assert cfg.source == tmp_path / "config.yaml"


def test_shipped_example_config_is_the_docs_example(tmp_path):
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "config_instance.yaml")
    assert shipped.model_dump() == load(tmp_path, DOCS_CONFIG).model_dump()


def test_shipped_example_cryosiam_dask_section_is_valid(tmp_path):
    """Uncommenting the example's cryosiam_dask section gives exactly the defaults it documents."""
    text = (Path(__file__).resolve().parents[2] / "configs" / "config_instance.yaml").read_text()
    text = text.replace("#cryosiam_dask:", "cryosiam_dask:").replace("\n#  ", "\n  ")
    assert "\ncryosiam_dask:\n  chunk_size" in text
    assert load(tmp_path, text).cryosiam_dask == DaskSettings()


def test_golden_config_loads_unchanged(golden, monkeypatch):
    monkeypatch.chdir(golden)  # its paths are relative to its folder
    cfg = load_config("config_instance.yaml")
    assert cfg.data_folder == golden / "data"
    assert cfg.checkpoint_path == golden / "model" / "cryosiam_instance_tiny.ckpt"
    assert cfg.save_raw_predictions is True and cfg.hyper_parameters.batch_size == 2
    assert cfg.parameters.network.max_center_distance == 4
    assert cfg.validate_paths() == [golden / "data" / "TS_tiny.mrc"]


def test_dev_config_with_semantic_and_filtering_keys(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="cryosiam_dask"):
        cfg = load(tmp_path, DEV_CONFIG)
    assert cfg.mask_folder is None  # '' = no mask
    assert cfg.semantic_predictions == Path("/scratch/stojanov/mycoplasma_data/vpp/old/semantic_predictions")
    assert cfg.semantic_foreground_labels == [2]
    assert cfg.test_files == ["TS_56_6.80Apx.mrc", "TS_61_6.80Apx.mrc"]
    assert cfg.checkpoint_path.name == "model-best.ckpt"
    assert "filtering_mask_labels" in caplog.text and "instance_labels_folder" in caplog.text
    assert {"filtering_mask_folder", "eval_skip_prediction"} <= IGNORED_KEYS


# ---------------------------------------------------------------------------------------------- defaults


def test_postprocessing_defaults_to_true_when_absent(tmp_path, project):
    del project["parameters"]["network"]["postprocessing"]
    assert load(tmp_path, project).parameters.network.postprocessing is True


def test_checkpoint_falls_back_to_log_dir(tmp_path, project):
    del project["trained_model"]
    assert load(tmp_path, project).checkpoint_path == tmp_path / "model" / "model_best.ckpt"
    project["trained_model"] = None
    assert load(tmp_path, project).checkpoint_path == tmp_path / "model" / "model_best.ckpt"


def test_no_checkpoint_and_no_log_dir(tmp_path, project):
    del project["trained_model"], project["log_dir"]
    with pytest.raises(ConfigError, match=r"config\.yaml: missing required key 'trained_model'"):
        load(tmp_path, project)


def test_null_statistics_and_relative_paths(tmp_path, project, monkeypatch):
    project["parameters"]["data"].update(mean=None, std=None)
    project["prediction_folder"] = "preds"
    monkeypatch.chdir(tmp_path / "lamella")
    cfg = load(tmp_path, project)
    assert cfg.parameters.data.mean is None and cfg.parameters.data.std is None
    assert cfg.prediction_folder == tmp_path / "lamella" / "preds"  # relative to the cwd, not to the file
    assert cfg.work_dir == tmp_path / "lamella" / "preds" / ".cryosiam_dask"


def test_semantic_labels_required_with_semantic_predictions(tmp_path, project):
    project["semantic_predictions"] = str(tmp_path)
    with pytest.raises(ConfigError, match="'semantic_predictions' is set but 'semantic_foreground_labels'"):
        load(tmp_path, project)
    project["semantic_foreground_labels"] = 3
    assert load(tmp_path, project).semantic_foreground_labels == [3]


def test_dask_section_and_empty_section(tmp_path, project):
    project["cryosiam_dask"] = {"chunk_size": [64, 96, 32], "halo": 12, "tiling": "exact", "amp": "bf16",
                                "output_formats": ["mrc", "star"], "work_dir": "scratch"}
    s = load(tmp_path, project).cryosiam_dask
    assert s.chunk_size == (64, 96, 32) and s.halo == 12 and s.tiling == "exact" and s.amp == "bf16"
    assert s.output_formats == ["mrc", "star"] and s.work_dir == Path.cwd() / "scratch"
    project["cryosiam_dask"] = None  # the header left in, every key commented out
    assert load(tmp_path, project).cryosiam_dask == DaskSettings()


def test_dask_defaults():
    s = DaskSettings()
    assert s.chunk_size == (128, 256, 256) and s.halo == 32 and s.tiling == "exact" and s.device == "auto"
    assert s.dashboard_address == "127.0.0.1:8787" and s.output_formats == ["cryosiam", "ome-zarr"]
    assert s.scheduler_address is None and s.amp is None and s.memory_limit == "auto"


def test_halo_below_the_reach_is_refused_when_loaded(tmp_path, project):
    """halo 8 with distance_type 1 (reach 9): one line naming the key, before any stage (issue 21)."""
    project["parameters"]["network"]["distance_type"] = 1
    project["cryosiam_dask"] = {"halo": 8}
    with pytest.raises(ConfigError, match=r"cryosiam_dask\.halo is 8 but must exceed 9 \(the reach") as e:
        load(tmp_path, project)
    assert "\n" not in str(e.value)
    project["parameters"]["network"]["distance_type"] = 0  # reach 3: a halo of 8 is enough
    assert load(tmp_path, project).post_params.halo == 8


def test_overrides_apply_over_file_section(tmp_path, project):
    project["cryosiam_dask"] = {"halo": 12, "tiling": "exact"}
    cfg = load(tmp_path, project, {"halo": 16, "chunk_size": (32, 32, 32), "device": None})
    s = cfg.cryosiam_dask
    assert (s.halo, s.tiling, s.chunk_size, s.device) == (16, "exact", (32, 32, 32), "auto")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"halo": "x"}, r"^command line: wrong type for 'cryosiam_dask\.halo': expected an integer, found"),
        ({"tiling": "slow"}, r"^command line: invalid value for 'cryosiam_dask\.tiling': expected one of"),
        ({"chunk_size": (1, 2)}, r"^command line: invalid value for 'cryosiam_dask\.chunk_size': expected 3"),
        ({"n_workers": 0}, r"^command line: invalid value for 'cryosiam_dask\.n_workers': input should be"),
        ({"chunk_sise": (1, 2, 3)}, r"unknown key 'cryosiam_dask\.chunk_sise' \(did you mean 'chunk_size'"),
    ],
)
def test_bad_overrides(tmp_path, project, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, project, overrides)


# ---------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    "key",
    ["parameters.network.distance_type", "parameters.network.threshold_foreground", "parameters.data.std",
     "hyper_parameters.batch_size", "test_files", "save_raw_predictions", "data_folder", "prediction_folder",
     "file_extension", "parameters.network", "hyper_parameters"],
)
def test_missing_required_key(tmp_path, project, key):
    *parents, leaf = key.split(".")
    node = project
    for p in parents:
        node = node[p]
    del node[leaf]
    with pytest.raises(ConfigError, match=rf"^\S*config\.yaml: missing required key '{key}'$"):
        load(tmp_path, project)


@pytest.mark.parametrize(
    ("section", "bad", "hint"),
    [
        ("parameters.network", "treshold_foreground", "did you mean 'threshold_foreground'"),
        ("parameters.data", "meen", "did you mean 'mean'"),
        ("", "save_raw_prediction", "did you mean 'save_raw_predictions'"),
        ("", "filtering_mask_label", "did you mean 'filtering_mask_labels'"),
        ("", "batch_size", "did you mean 'hyper_parameters.batch_size'"),
        ("hyper_parameters", "xyz", "valid keys here: batch_size"),
        ("cryosiam_dask", "chunks_size", "did you mean 'chunk_size'"),
    ],
)
def test_unknown_key(tmp_path, project, section, bad, hint):
    node = project
    for p in filter(None, section.split(".")):
        node = node.setdefault(p, {})
    node[bad] = 1
    dotted = f"{section}.{bad}" if section else bad
    with pytest.raises(ConfigError, match=rf"config\.yaml: unknown key '{dotted}' \({hint}"):
        load(tmp_path, project)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("parameters.network.threshold_foreground", "0.65", "expected a number, found str '0.65'"),
        ("parameters.network.distance_type", 1.5, "expected an integer, found float 1.5"),
        ("save_raw_predictions", "yes", "expected true or false, found str 'yes'"),
        ("test_files", "TS_01.mrc", "expected a list of strings or null, found str"),
        ("parameters.gpu_devices", "0,1", "expected an integer or a list of integers or null"),
        ("parameters.data", None, "expected a mapping of keys, found null"),
        ("prediction_folder", None, "expected a path, found null"),
        ("cryosiam_dask.output_formats", "mrc", "expected a list of values from 'cryosiam'"),
    ],
)
def test_wrong_type(tmp_path, project, key, value, expected):
    *parents, leaf = key.split(".")
    node = project
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"config\.yaml: wrong type for '{key}': {expected}"):
        load(tmp_path, project)


def test_wrong_type_in_list_item_and_error_count(tmp_path, project):
    project["test_files"] = ["TS_01.mrc", 3]
    project["hyper_parameters"]["batch_size"] = 0
    with pytest.raises(ConfigError) as info:
        load(tmp_path, project)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: wrong type for 'test_files[1]': expected a str")
    assert message.endswith("(and 1 more problem)") and "\n" not in message


def test_yaml_syntax_error(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "data_folder: [a, b\nmask_folder: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line 2, column \d+") as info:
        load_config(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "found"), [("", "null"), ("- a\n- b\n", "list"), ("just text", "str")])
def test_not_a_mapping(tmp_path, text, found):
    message = rf"x\.yaml: expected a mapping of keys at the top level, found {found}"
    with pytest.raises(ConfigError, match=message):
        load_config(write_yaml(tmp_path / "x.yaml", text))


def test_missing_config_file(tmp_path):
    with pytest.raises(InputFileError, match=r"config file '.*nothere\.yaml' does not exist"):
        load_config(tmp_path / "nothere.yaml")
    with pytest.raises(InputFileError, match="does not exist or is not a file"):
        load_config(tmp_path)


def test_empty_file_extension(tmp_path, project):
    project["file_extension"] = ""
    with pytest.raises(ConfigError, match="'file_extension' must not be empty"):
        load(tmp_path, project)


# ---------------------------------------------------------------------------------------------- file lists


def test_input_files_null_lists_extension_sorted(tmp_path, project):
    cfg = load(tmp_path, project)
    assert cfg.input_files() == [tmp_path / "data" / "TS_01.mrc", tmp_path / "data" / "TS_02.mrc"]
    assert cfg.stem(cfg.input_files()[0]) == "TS_01"


def test_input_files_test_files_keep_order(tmp_path, project):
    project["test_files"] = ["TS_02.mrc", "TS_03.rec"]
    data = tmp_path / "data"
    assert load(tmp_path, project).input_files() == [data / "TS_02.mrc", data / "TS_03.rec"]


def test_filename_replaces_the_list(tmp_path, project, monkeypatch):
    project["test_files"] = ["TS_01.mrc"]
    cfg = load(tmp_path, project)
    assert cfg.input_files("TS_02.mrc") == [tmp_path / "data" / "TS_02.mrc"]
    assert cfg.input_files(str(tmp_path / "data" / "TS_03.rec")) == [tmp_path / "data" / "TS_03.rec"]
    monkeypatch.chdir(tmp_path)
    assert cfg.input_files("data/TS_02.mrc") == [tmp_path / "data" / "TS_02.mrc"]
    with pytest.raises(InputFileError, match=r"--filename 'TS_09\.mrc' does not exist \(looked in data_f"):
        cfg.input_files("TS_09.mrc")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"data_folder": "/nonexistent/data"}, InputFileError, r"data_folder '/nonexistent/data' does not"),
        ({"file_extension": ".tif"}, InputFileError, r"no file ending with '\.tif' in data_folder '.*data'"),
        ({"test_files": ["TS_01.mrc", "TS_09.mrc"]}, InputFileError,
         r"test_files entry 'TS_09\.mrc' does not exist in data_folder"),
        ({"test_files": []}, ConfigError, r"'test_files' is an empty list \(use null"),
        ({"test_files": ["TS_01.mrc", "TS_02.mrc", "./TS_01.mrc"]}, ConfigError,
         r"'test_files' lists the same tomogram twice: 'TS_01\.mrc' and '\./TS_01\.mrc'"),
    ],
)
def test_input_files_errors(tmp_path, project, change, error, message):
    project.update(change)
    cfg = load(tmp_path, project)
    with pytest.raises(error, match=message) as info:
        cfg.input_files()
    assert "\n" not in str(info.value)


def test_validate_paths(tmp_path, project):
    data = tmp_path / "data"
    assert load(tmp_path, project).validate_paths() == [data / "TS_01.mrc", data / "TS_02.mrc"]
    project["mask_folder"] = str(tmp_path / "no_lamella")
    with pytest.raises(InputFileError, match=r"mask_folder '.*no_lamella' does not exist"):
        load(tmp_path, project).validate_paths()
    project["mask_folder"] = ""
    project["trained_model"] = str(tmp_path / "missing.ckpt")
    with pytest.raises(InputFileError, match=r"^checkpoint '.*missing\.ckpt' does not exist \(trained_mod"):
        load(tmp_path, project).validate_paths()
    del project["trained_model"]
    with pytest.raises(InputFileError, match=r"checkpoint '.*model/model_best\.ckpt' does not exist \("):
        load(tmp_path, project).validate_paths()


def test_copick_flags_complete_the_file_copick_block(tmp_path, project):
    for key in ("data_folder", "test_files", "file_extension"):
        project.pop(key)
    project["cryosiam_dask"] = {"copick": {"config": "p.json", "voxel_spacing": 10.0, "tomo_type": "wbp",
                                           "object_name": "ribosome"}}
    cfg = load(tmp_path, project, {"copick": {"tomo_type": "denoised", "runs": ["TS-1"]}})
    cp = cfg.cryosiam_dask.copick
    assert (cp.tomo_type, cp.runs, cp.voxel_spacing) == ("denoised", ["TS-1"], 10.0)
    assert cp.object_name == "ribosome"
    assert (cp.user_id, cp.session_id) == ("cryosiam-dask", "0")


def test_without_copick_the_file_keys_stay_required(tmp_path, project):
    project.pop("data_folder")
    with pytest.raises(ConfigError, match=r"missing required key 'data_folder'"):
        load(tmp_path, project)
    project["test_files"] = ["https://host/TS_01.zarr"]
    assert load(tmp_path, project).data_folder is None  # URLs only: no data_folder needed


def test_urls_and_file_names_are_not_mixed(tmp_path, project):
    project["test_files"] = ["TS_01.mrc", "s3://bucket/TS_02.zarr"]
    with pytest.raises(ConfigError, match=r"'test_files' mixes URLs and file names"):
        load(tmp_path, project).input_files()
