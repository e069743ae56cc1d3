"""The README's code runs: every Python block executed on the demo's inputs, every command's flags exist."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = "not run by the tests"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _close(namespace: dict) -> None:
    client = namespace.get("client")
    if client is not None:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


@pytest.fixture
def readme_inputs(tmp_path, monkeypatch) -> Path:
    """The demo's inputs where the README's blocks look: configs/config_instance.yaml, TS_01.mrc and
    cryosiam_instance.ckpt in the working directory."""
    from cryosiam_dask.demo import write_demo_inputs

    config = write_demo_inputs(tmp_path / "demo", shape=(32, 64, 64), stem="TS_01")
    (tmp_path / "configs").mkdir()
    cfg = yaml.safe_load(config.read_text())
    cfg["cryosiam_dask"] = {"dashboard_address": None, "output_formats": ["cryosiam"]}
    (tmp_path / "configs" / "config_instance.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(tmp_path / "demo" / "data" / "TS_01.mrc", tmp_path / "TS_01.mrc")
    shutil.copy(cfg["trained_model"], tmp_path / "cryosiam_instance.ckpt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(readme_inputs, index):
    code = _blocks("python")[index]
    if NOT_RUN in code:
        pytest.skip(code.splitlines()[0])
    namespace: dict = {"__name__": "__main__"}
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    finally:
        _close(namespace)
    if "results" in namespace:  # the quick start: the demo tomogram segmented
        assert namespace["results"][0].n_instances > 0
    if "labels" in namespace:  # the Jupyter recipe: a lazy dask array of ids
        assert namespace["labels"].dtype == "uint32" and namespace["labels"].ndim == 3


def test_every_flag_of_the_readme_exists():
    from cryosiam_dask.cli import app

    runner = CliRunner()
    helps = {cmd: runner.invoke(app, [cmd, "--help"], terminal_width=200).output
             for cmd in ("instance_predict", "convert", "demo")}
    used = set()
    for block in _blocks("bash"):
        for line in block.splitlines():
            match = re.match(r"\s*cryosiam_dask (\w+)(.*)", line)
            if match:
                used |= {(match.group(1), flag) for flag in re.findall(r"(--[\w-]+)", match.group(2))}
    assert used, "no cryosiam_dask command found in the README"
    missing = sorted((cmd, flag) for cmd, flag in used if flag not in helps[cmd])
    assert not missing, missing
