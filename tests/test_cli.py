"""cryosiam_dask.cli: CryoSiam's spellings, flag overrides, one-line errors with exit code 2, lazy imports.

The pipeline, io and demo modules are replaced by fakes in ``sys.modules``, so these tests check the CLI only
and do not depend on (or wait for) the real stages.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cryosiam_dask.cli import app
from cryosiam_dask.config import DaskSettings
from cryosiam_dask.errors import InputFileError

runner = CliRunner()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A valid instance config whose inputs exist; prediction_folder does not exist yet."""
    (tmp_path / "data").mkdir()
    for name in ("TS_01.mrc", "TS_02.mrc"):
        (tmp_path / "data" / name).write_bytes(b"")
    (tmp_path / "model.ckpt").write_bytes(b"")
    cfg = {
        "data_folder": str(tmp_path / "data"),
        "mask_folder": "",
        "log_dir": str(tmp_path),
        "prediction_folder": str(tmp_path / "predictions"),
        "trained_model": str(tmp_path / "model.ckpt"),
        "file_extension": ".mrc",
        "test_files": None,
        "save_raw_predictions": False,
        "parameters": {
            "gpu_devices": 1,
            "data": {"patch_size": [32, 32, 32], "min": 0, "max": 1, "mean": 0, "std": 1},
            "network": {
                "in_channels": 1,
                "spatial_dims": 3,
                "threshold_foreground": 0.65,
                "boundary_bias": 0.8,
                "min_center_distance": 1,
                "max_center_distance": 4,
                "distance_type": 1,
                "postprocessing": False,
            },
        },
        "hyper_parameters": {"batch_size": 2},
        "cryosiam_dask": {"halo": 12, "tiling": "exact"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fake_module(monkeypatch, name: str, **functions) -> list:
    """Put a module `name` with the given functions in sys.modules; return the list of recorded calls."""
    calls: list = []
    module = types.ModuleType(name)
    for fname, result in functions.items():

        def record(*args, _fname=fname, _result=result, **kwargs):
            calls.append((_fname, args, kwargs))
            if isinstance(_result, BaseException):
                raise _result
            return _result(*args, **kwargs) if callable(_result) else _result

        setattr(module, fname, record)
    monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def pipeline(monkeypatch) -> list:
    return fake_module(monkeypatch, "cryosiam_dask.run.driver", instance_predict=["result"])


def assert_one_line_error(result, pattern: str) -> None:
    import re

    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------- instance_predict


@pytest.mark.parametrize("spelling", ["--config_file", "--config-file"])
def test_instance_predict_calls_pipeline(config_file, pipeline, spelling):
    result = runner.invoke(app, ["instance_predict", f"{spelling}={config_file}"])
    assert result.exit_code == 0, result.output
    [(name, (cfg,), kwargs)] = pipeline
    assert name == "instance_predict" and kwargs == {"filename": None}
    assert cfg.source == config_file and cfg.hyper_parameters.batch_size == 2
    assert (cfg.cryosiam_dask.halo, cfg.cryosiam_dask.tiling) == (12, "exact")  # the file's section
    assert cfg.cryosiam_dask.chunk_size == DaskSettings().chunk_size


def test_instance_predict_filename_and_dashed_alias(config_file, pipeline):
    result = runner.invoke(
        app, ["instance-predict", "--config_file", str(config_file), "--filename", "TS_02.mrc"]
    )
    assert result.exit_code == 0, result.output
    assert pipeline[0][2] == {"filename": "TS_02.mrc"}


def test_flags_override_the_config(config_file, pipeline, tmp_path):
    args = [
        "instance_predict",
        "--config_file",
        str(config_file),
        "--chunk-size",
        "16",
        "32",
        "48",
        "--halo",
        "14",
        "--tiling",
        "fast",
        "--device",
        "cpu",
        "--scheduler-address",
        "tcp://h:8786",
        "--n-workers",
        "3",
        "--threads-per-worker",
        "2",
        "--memory-limit",
        "4GB",
        "--work-dir",
        str(tmp_path / "w"),
        "--formats",
        "cryosiam, mrc,star",
        "--amp",
        "bf16",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    s = pipeline[0][1][0].cryosiam_dask
    assert (s.chunk_size, s.halo, s.tiling, s.device, s.scheduler_address) == (
        (16, 32, 48),
        14,
        "fast",
        "cpu",
        "tcp://h:8786",
    )
    assert (s.n_workers, s.threads_per_worker, s.memory_limit, s.amp) == (3, 2, "4GB", "bf16")
    assert s.work_dir == tmp_path / "w" and s.output_formats == ["cryosiam", "mrc", "star"]


@pytest.mark.parametrize(
    ("value", "expected"), [("none", 0), ("2000000000", 2_000_000_000), ("auto", "auto")]
)
def test_memory_limit_flag(config_file, pipeline, value, expected):
    result = runner.invoke(
        app, ["instance_predict", "--config_file", str(config_file), "--memory-limit", value]
    )
    assert result.exit_code == 0, result.output
    assert pipeline[0][1][0].cryosiam_dask.memory_limit == expected


def edit(config_file: Path, change) -> Path:
    cfg = yaml.safe_load(config_file.read_text())
    change(cfg)
    config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config_file


BAD_INPUTS = {
    "missing key": (
        lambda c: c["parameters"]["network"].pop("distance_type"),
        [],
        r"config\.yaml: missing required key 'parameters\.network\.distance_type'$",
    ),
    "misspelt key": (
        lambda c: c["parameters"]["network"].update(treshold_foreground=0.5),
        [],
        r"unknown key 'parameters\.network\.treshold_foreground' \(did you mean 'threshold_foreground'",
    ),
    "wrong type": (
        lambda c: c["hyper_parameters"].update(batch_size="ten"),
        [],
        r"wrong type for 'hyper_parameters\.batch_size': expected an integer, found str 'ten'",
    ),
    "bad flag value": (
        lambda c: None,
        ["--tiling", "slow"],
        r"command line: invalid value for 'cryosiam_dask\.tiling': expected one of 'fast', 'exact'",
    ),
    "bad format": (
        lambda c: None,
        ["--formats", "cryosiam,tif"],
        r"'cryosiam_dask\.output_formats\[1\]': expected one of 'cryosiam'.*found str 'tif'",
    ),
    "missing data_folder": (
        lambda c: c.update(data_folder="/nonexistent/d"),
        [],
        r"data_folder '/nonexistent/d' does not exist",
    ),
    "no tomograms": (
        lambda c: c.update(file_extension=".rec"),
        [],
        r"no file ending with '\.rec' in data_folder",
    ),
    "missing test file": (
        lambda c: c.update(test_files=["TS_01.mrc", "TS_07.mrc"]),
        [],
        r"test_files entry 'TS_07\.mrc' does not exist",
    ),
    "empty test_files": (lambda c: c.update(test_files=[]), [], r"'test_files' is an empty list"),
    "duplicate": (
        lambda c: c.update(test_files=["TS_01.mrc", "TS_01.mrc"]),
        [],
        r"lists the same tomogram twice",
    ),
    "missing filename": (
        lambda c: None,
        ["--filename", "TS_05.mrc"],
        r"--filename 'TS_05\.mrc' does not exist",
    ),
    "missing checkpoint": (
        lambda c: c.update(trained_model="/nonexistent/m.ckpt"),
        [],
        r"checkpoint '/nonexistent/m\.ckpt' does not exist",
    ),
    "missing mask folder": (
        lambda c: c.update(mask_folder="/nonexistent/lamella"),
        [],
        r"mask_folder '/nonexistent/lamella' does not exist",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written(config_file, pipeline, tmp_path, case):
    change, flags, pattern = BAD_INPUTS[case]
    result = runner.invoke(app, ["instance_predict", "--config_file", str(edit(config_file, change)), *flags])
    assert_one_line_error(result, pattern)
    assert pipeline == []  # the pipeline never started
    assert not (tmp_path / "predictions").exists()


def test_yaml_error_and_missing_config(tmp_path, pipeline):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_folder: [a\nb: 1\n")
    assert_one_line_error(
        runner.invoke(app, ["instance_predict", "--config_file", str(bad)]),
        r"bad\.yaml: invalid YAML at line 2",
    )
    assert_one_line_error(
        runner.invoke(app, ["instance_predict", "--config_file", str(tmp_path / "no.yaml")]),
        r"config file '.*no\.yaml' does not exist",
    )


def test_error_raised_by_the_pipeline_is_one_line(config_file, monkeypatch):
    fake_module(
        monkeypatch,
        "cryosiam_dask.run.driver",
        instance_predict=InputFileError("mask TS_01 is (2, 3, 4)\nbut tomogram is (5, 6, 7)"),
    )
    result = runner.invoke(app, ["instance_predict", "--config_file", str(config_file)])
    assert_one_line_error(result, r"^error: mask TS_01 is \(2, 3, 4\) but tomogram is \(5, 6, 7\)$")


def test_other_exceptions_keep_their_traceback(config_file, monkeypatch):
    fake_module(monkeypatch, "cryosiam_dask.run.driver", instance_predict=RuntimeError("a bug"))
    result = runner.invoke(app, ["instance_predict", "--config_file", str(config_file)])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError) and result.exc_info[2] is not None
    assert "error: " not in result.stderr


def test_debug_flag_sets_log_level(config_file, pipeline):
    logger = logging.getLogger("cryosiam_dask")
    level = logger.level
    try:
        assert (
            runner.invoke(app, ["instance_predict", "--config_file", str(config_file), "--debug"]).exit_code
            == 0
        )
        assert logger.level == logging.DEBUG
        assert (
            "DEBUG"
            in runner.invoke(app, ["instance_predict", "--config_file", str(config_file), "--debug"]).stderr
        )
        assert runner.invoke(app, ["instance_predict", "--config_file", str(config_file)]).exit_code == 0
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(level)
        for h in [h for h in logger.handlers if getattr(h, "_cryosiam_dask_cli", False)]:
            logger.removeHandler(h)


# ---------------------------------------------------------------------------------- convert, demo


def test_convert_calls_io(tmp_path, monkeypatch):
    calls = fake_module(
        monkeypatch,
        "cryosiam_dask.io.tomograms",
        tomogram_to_zarr=types.SimpleNamespace(shape=(2, 3, 4), chunks=(2, 3, 4), dtype="f4"),
        stem_of=lambda p: Path(p).name.removesuffix(".mrc"),
    )
    tomo = tmp_path / "TS_01.mrc"
    tomo.write_bytes(b"")
    assert runner.invoke(app, ["convert", str(tomo)]).exit_code == 0
    assert (
        runner.invoke(
            app, ["convert", str(tomo), "--out", str(tmp_path / "x.zarr"), "--chunk-size", "8", "16", "32"]
        ).exit_code
        == 0
    )
    convert_calls = [c for c in calls if c[0] == "tomogram_to_zarr"]
    assert convert_calls[0][1:] == (
        (tomo, tmp_path / "TS_01.zarr"),
        {"chunk_size": DaskSettings().chunk_size},
    )
    assert convert_calls[1][1:] == ((tomo, tmp_path / "x.zarr"), {"chunk_size": (8, 16, 32)})


def test_convert_errors(tmp_path, monkeypatch):
    calls = fake_module(monkeypatch, "cryosiam_dask.io.tomograms", tomogram_to_zarr=None, stem_of=None)
    assert_one_line_error(
        runner.invoke(app, ["convert", str(tmp_path / "none.mrc")]), r"tomogram '.*none\.mrc' does not exist"
    )
    (tmp_path / "a.mrc").write_bytes(b"")
    assert_one_line_error(
        runner.invoke(app, ["convert", str(tmp_path / "a.mrc"), "--chunk-size", "0", "8", "8"]),
        r"--chunk-size must be positive",
    )
    assert calls == []


def test_convert_real_mrc(tmp_path):
    """End to end with the real io module (skipped if it is not there yet)."""
    io = pytest.importorskip("cryosiam_dask.io.tomograms")
    if not hasattr(io, "tomogram_to_zarr"):
        pytest.skip("cryosiam_dask.io.tomograms.tomogram_to_zarr not written yet")
    import mrcfile
    import numpy as np
    import zarr

    volume = np.random.default_rng(0).random((6, 10, 12), dtype=np.float32)
    with mrcfile.new(tmp_path / "TS_01.mrc") as mrc:
        mrc.set_data(volume)
    result = runner.invoke(app, ["convert", str(tmp_path / "TS_01.mrc"), "--chunk-size", "4", "5", "6"])
    assert result.exit_code == 0, result.output
    array = zarr.open_group(tmp_path / "TS_01.zarr", mode="r")["0"]
    assert array.chunks == (4, 5, 6)
    np.testing.assert_array_equal(array[...], volume)


def test_demo_passes_only_given_options(tmp_path, monkeypatch):
    done = types.SimpleNamespace(n_found=5, n_matched=4, n_true=6, folder=tmp_path)
    calls = fake_module(monkeypatch, "cryosiam_dask.demo", run_demo=done)
    result = runner.invoke(
        app, ["demo", "--folder", str(tmp_path), "--shape", "32", "64", "64", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [("run_demo", (), {"folder": tmp_path, "shape": (32, 64, 64), "device": "cpu"})]
    assert "5 instances found, 4 of 6 particles matched" in result.stdout
    assert runner.invoke(app, ["demo"]).exit_code == 0
    assert calls[1] == ("run_demo", (), {})


# ---------------------------------------------------------------------------------- help, imports


@pytest.mark.parametrize("command", [[], ["instance_predict"], ["convert"], ["demo"]])
def test_help_loads_no_heavy_module(command):
    """--help runs without importing torch, dask or the GPU stack (so it is instant)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cryosiam_dask.cli import app\n"
        f"r = CliRunner().invoke(app, {[*command, '--help']!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "print('Usage' in r.output and '--help' in r.output)\n"
        "heavy = ('torch', 'dask', 'cupy', 'cucim', 'dask_cuda', 'monai')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["True", "[]"]


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "cryosiam_dask", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "cryosiam_dask 0.1.0"
    out = subprocess.run(
        [sys.executable, "-m", "cryosiam_dask", "instance_predict", "--config_file", "/no/c.yaml"],
        capture_output=True,
        text=True,
    )
    assert (
        out.returncode == 2
        and out.stderr.strip() == "error: config file '/no/c.yaml' does not exist or is not a file"
    )


def test_scheduler_file_flag(config_file, pipeline, tmp_path):
    result = runner.invoke(app, ["instance_predict", "--config_file", str(config_file),
                                 "--scheduler-file", str(tmp_path / "cluster.json")])
    assert result.exit_code == 0, result.output
    assert pipeline[0][1][0].cryosiam_dask.scheduler_file == tmp_path / "cluster.json"
