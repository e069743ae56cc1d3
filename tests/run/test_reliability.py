"""Reliability (issues 7, 14): resume after SIGKILL, worker loss, workers that die or cannot start, tasks that
raise, disk errors, bad input, concurrent runs, stale stores.

Runs are killed by the fault injector ``tests/faults/sitecustomize.py`` (on PYTHONPATH, with
``CRYOSIAM_DASK_TEST_DIE_AFTER="<stage>:<n>"`` the run SIGKILLs its own process group once n chunks of that
stage are recorded, so the moment is exact and not timing-dependent; ``CRYOSIAM_DASK_TEST_FAULT`` breaks the
workers: see that module); the package has no test hook.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import yaml

from cryosiam_dask.config import load_config
from cryosiam_dask.demo import DEMO_STEM, write_demo_inputs
from cryosiam_dask.errors import CheckpointError, ConfigError, InputFileError, OutputError, TomogramsFailed
from cryosiam_dask.run import locks
from cryosiam_dask.run.driver import instance_predict
from cryosiam_dask.testing.synthetic import write_mask_h5, write_mrc

SHAPE = (32, 64, 64)
BLOCKS = 18  # inference blocks of the case (tiny architecture, patch 32); checked against the run's report
OURS = {
    "chunk_size": [16, 32, 32],  # 8 chunks
    "halo": 16,
    "n_workers": 1,
    "threads_per_worker": 2,
    "output_formats": ["cryosiam", "mrc"],
}


def _case(tmp: Path, **changes) -> Path:
    """The demo's inputs in ``tmp`` (32x64x64, 8 chunks); ``changes`` update the top level of the config."""
    path = write_demo_inputs(tmp, shape=SHAPE)
    cfg = yaml.safe_load(path.read_text())
    cfg["cryosiam_dask"] = dict(OURS)
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tomogram(tmp: Path) -> np.ndarray:
    with mrcfile.open(tmp / "data" / f"{DEMO_STEM}.mrc") as m:
        return m.data.copy()


def _outputs(folder: Path, stem: str = DEMO_STEM) -> dict[str, object]:
    """Every output of a run, as arrays and text, for an exact comparison."""
    with h5py.File(folder / f"{stem}_instance_preds.h5", "r") as f:
        found = {"instances": f["instances"][...]}
    with h5py.File(folder / f"{stem}_preds.h5", "r") as f:
        found.update({k: f[k][...] for k in ("foreground", "distances", "boundaries")})
    with mrcfile.open(folder / f"{stem}_instances.mrc") as m:
        found["mrc"] = m.data.copy()
    found["csv"] = (folder / f"{stem}_instance_regions.csv").read_text()
    return found


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], str):
            assert a[key] == b[key], key
        else:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


DIE_AFTER_ENV = "CRYOSIAM_DASK_TEST_DIE_AFTER"
FAULT_ENV = "CRYOSIAM_DASK_TEST_FAULT"
FAULTS = Path(__file__).resolve().parent / "faults"


def _cli(
    config: Path, die_after: str | None = None, timeout: float = 240, fault: str | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (DIE_AFTER_ENV, FAULT_ENV)}
    if die_after:
        env[DIE_AFTER_ENV] = die_after
    if fault:
        env[FAULT_ENV] = fault
    if die_after or fault:
        env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "cryosiam_dask", "instance_predict", "--config_file", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # the hook kills this process group: the CLI and its workers, not pytest
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, object]:
    """Outputs of an uninterrupted run (threads cluster in this process)."""
    from distributed import Client, LocalCluster

    tmp = tmp_path_factory.mktemp("clean")
    cfg = _case(tmp)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            instance_predict(load_config(cfg), client=c)
    return _outputs(tmp / "predictions")


def _markers(tmp: Path, stage: str) -> int:
    return sum(1 for _ in (tmp / "predictions" / ".cryosiam_dask").glob(f"{DEMO_STEM}/*.done/{stage}/*.npz"))


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_kill_in_maps(tmp_path, clean, client, caplog):
    cfg = _case(tmp_path)
    killed = _cli(cfg, "maps:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    n_done = _markers(tmp_path, "maps")
    assert 3 <= n_done < BLOCKS  # a second thread may finish a block while the first one kills the run
    assert not (tmp_path / "predictions" / f"{DEMO_STEM}_instance_preds.h5").exists()
    assert (tmp_path / "predictions" / f".{DEMO_STEM}.cryosiam_dask.lock").exists()  # left by the dead run
    with caplog.at_level(logging.INFO, logger="cryosiam_dask"):
        [result] = instance_predict(load_config(cfg), client=client)
    assert "stale lock" in caplog.text
    assert result.report["maps_blocks_computed"] == BLOCKS - n_done  # only the unfinished blocks are rerun
    logging.getLogger(__name__).info("resume after maps:3 recomputed %s", result.report)
    _assert_same(_outputs(tmp_path / "predictions"), clean)
    assert not (tmp_path / "predictions" / f".{DEMO_STEM}.cryosiam_dask.lock").exists()


@pytest.mark.slow
def test_resume_after_kills_in_every_stage(tmp_path, clean):
    """Killed in maps, windows, labels and outputs in turn; each rerun redoes only what was unfinished."""
    cfg = _case(tmp_path)
    reused = {}
    for point in ("maps:2", "windows:3", "instances:5", "outputs:1"):
        run = _cli(cfg, point)
        assert run.returncode == -signal.SIGKILL, (point, run.stderr[-2000:])
        done = r"(\w+): (\d+) of \d+ (?:chunks|inference blocks) done in an earlier run"
        found = re.findall(done, run.stderr)
        found += [("windows", n) for n in re.findall(r"instances: (\d+) of 8 windows reused", run.stderr)]
        reused[point] = {name: int(n) for name, n in found}
        logging.getLogger(__name__).info("run killed at %s reused %s", point, reused[point])
    assert _markers(tmp_path, "maps") == BLOCKS and _markers(tmp_path, "windows") == 8
    assert _markers(tmp_path, "instances") == 8
    assert not (tmp_path / "predictions" / f"{DEMO_STEM}_instances.mrc").exists()  # killed after the h5
    final = _cli(cfg)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"maps: {BLOCKS} of {BLOCKS} inference blocks done in an earlier run" in final.stderr
    assert "8 of 8 windows reused" in final.stderr
    assert reused["maps:2"] == {}
    assert 2 <= reused["windows:3"]["maps"] < BLOCKS
    assert reused["instances:5"]["maps"] == BLOCKS and 3 <= reused["instances:5"]["windows"] < 8
    assert reused["outputs:1"] == {"maps": BLOCKS, "windows": 8, "labels": reused["outputs:1"]["labels"]}
    assert 5 <= reused["outputs:1"]["labels"] < 8
    _assert_same(_outputs(tmp_path / "predictions"), clean)


def test_changed_setting_does_not_reuse_stale_chunks(tmp_path, client):
    cfg_path = _case(tmp_path)
    [first] = instance_predict(load_config(cfg_path), client=client)
    assert first.report["maps_blocks"] == first.report["maps_blocks_computed"] == BLOCKS
    assert first.report["windows_computed"] == 8
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["parameters"]["network"]["threshold_foreground"] = 0.6
    cfg_path.write_text(yaml.safe_dump(cfg))
    [second] = instance_predict(load_config(cfg_path), client=client)
    assert second.report["maps_blocks_computed"] == 0  # maps do not depend on the threshold
    assert second.report["windows_computed"] == 8  # instances do: a new store
    ckpt = Path(cfg["trained_model"])
    os.utime(ckpt, ns=(time.time_ns(), time.time_ns() + 10**9))  # "a new checkpoint"
    [third] = instance_predict(load_config(cfg_path), client=client)
    assert third.report["maps_blocks_computed"] == BLOCKS


# ---------------------------------------------------------------------------------------------- workers
@pytest.mark.slow
def test_worker_killed_mid_run_gives_identical_output(tmp_path, clean):
    from distributed import Client, LocalCluster

    cfg = _case(tmp_path)
    killed: list[tuple[int, int]] = []

    def kill_one(c: Client) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and _markers(tmp_path, "maps") < 1:
            time.sleep(0.05)
        pids = c.run(os.getpid)
        pid = sorted(pids.values())[0]
        killed.append((pid, _markers(tmp_path, "maps")))
        os.kill(pid, signal.SIGKILL)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            thread = threading.Thread(target=kill_one, args=(c,))
            thread.start()
            [result] = instance_predict(load_config(cfg), client=c)
            thread.join()
    assert killed and killed[0][1] < 8, killed  # the worker died while maps chunks were still to do
    assert result.report["n_chunks"] == 8
    _assert_same(_outputs(tmp_path / "predictions"), clean)


# ------------------------------------------------------------------------------- workers that fail (14)
def _failed_run(tmp: Path, fault: str, limit_s: float = 150, code: int = 3) -> str:
    """Run the CLI with ``fault``; check the exit code (3: the tomogram failed, 2: the run could not start),
    bounded time, one error line, nothing complete."""
    t0 = time.monotonic()
    run = _cli(_case(tmp), fault=fault, timeout=limit_s + 60)  # the timeout only guards against a hang
    elapsed = time.monotonic() - t0
    assert run.returncode == code, run.stderr[-3000:]
    assert elapsed < limit_s, elapsed
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    visible = [p.name for p in (tmp / "predictions").iterdir() if not p.name.startswith(".")]
    assert visible == [], visible  # no output file, complete or not (partial ones are hidden siblings)
    logging.getLogger(__name__).info("%s: %.1f s: %s", fault, elapsed, errors[0])
    return errors[0]


def test_worker_killed_on_every_task_fails_fast(tmp_path):
    """As a worker the OS kills each time it loads torch: two deaths, then one line naming cause and limit."""
    error = _failed_run(tmp_path, "worker-dies:maps")
    assert "a dask worker died 2 times while running stage maps" in error
    assert "killed by signal 9" in error and "memory_limit is" in error
    worker_log = re.search(r"see the worker log (\S+)", error)
    assert worker_log and Path(worker_log.group(1)).is_file()
    assert _markers(tmp_path, "maps") == 0


def test_task_that_raises_fails_with_its_message_and_rerun_resumes(tmp_path, clean, client):
    error = _failed_run(tmp_path, "task-raises:windows")
    assert "stage instances failed: RuntimeError: injected fault in a windows task" in error
    assert _markers(tmp_path, "maps") == BLOCKS and _markers(tmp_path, "windows") == 0
    [result] = instance_predict(load_config(tmp_path / "config_instance.yaml"), client=client)
    assert result.report["maps_blocks_computed"] == 0  # the maps of the failed run are reused
    _assert_same(_outputs(tmp_path / "predictions"), clean)


def test_worker_that_cannot_import_fails_at_start(tmp_path):
    """Such a worker used to hang the run (distributed cannot unpickle the task it is sent)."""
    error = _failed_run(tmp_path, "worker-import:cryosiam_dask.network.predict", limit_s=90, code=2)
    assert "cannot import cryosiam_dask.run.maps (ImportError: libbroken.so" in error


def test_worker_that_cannot_start(tmp_path):
    error = _failed_run(tmp_path, "worker-start", limit_s=90, code=2)
    assert "the dask workers of the local cpu cluster could not start" in error
    assert "exited with status 3" in error


def test_cluster_failures_are_one_line():
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    from cryosiam_dask.errors import ClusterError, TaskError
    from cryosiam_dask.run.failures import stage_error

    class Worker:
        address, memory_limit = "tcp://127.0.0.1:1", 2 * 2**30

    killed = stage_error(KilledWorker("write_chunk-abc", Worker(), 1), "maps")
    assert isinstance(killed, ClusterError) and "died 2 times while running stage maps" in str(killed)
    assert "memory_limit is 2.00 GiB per worker" in str(killed)
    for e in (FutureCancelledError("k", "scheduler-connection-lost"), CommClosedError("in <TCP>: closed")):
        gone = stage_error(e, "instances")
        assert isinstance(gone, ClusterError) and "scheduler or its workers went away" in str(gone)
    raised = stage_error(ValueError("bad\nvalue"), "outputs")
    assert isinstance(raised, TaskError) and "ValueError: bad value" in str(raised)
    assert "\n" not in str(killed) + str(gone) + str(raised)
    interrupt = KeyboardInterrupt()
    assert stage_error(interrupt, "maps") is interrupt


# ----------------------------------------------------------------------------------------- stale stores
def _stores(tmp: Path) -> set[str]:
    folder = tmp / "predictions" / ".cryosiam_dask" / DEMO_STEM
    return {p.name for p in folder.glob("*.zarr")} if folder.is_dir() else set()


def test_stale_stores_are_collected_after_a_successful_run(tmp_path, client):
    cfg_path = _case(tmp_path)
    instance_predict(load_config(cfg_path), client=client)
    first = _stores(tmp_path)
    assert {n.split("-")[0] for n in first} == {"maps", "instances"}
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["parameters"]["network"]["threshold_foreground"] = 0.6  # a new instances store, the same maps
    cfg_path.write_text(yaml.safe_dump(cfg))
    instance_predict(load_config(cfg_path), client=client)
    second = _stores(tmp_path)
    maps = {n for n in first if n.startswith("maps-")}
    assert maps <= second and len(second) == 2 and not (first - maps) & second  # the old instances: gone
    assert not [p for p in (tmp_path / "predictions" / ".cryosiam_dask" / DEMO_STEM).iterdir()
                if p.name.startswith("instances-") and p.name.split(".")[0] + ".zarr" not in second]
    cfg["parameters"]["network"]["threshold_foreground"] = 0.55
    cfg["cryosiam_dask"]["work_dir_cleanup"] = "keep"
    cfg_path.write_text(yaml.safe_dump(cfg))
    instance_predict(load_config(cfg_path), client=client)
    assert second < _stores(tmp_path) and len(_stores(tmp_path)) == 3  # keep: nothing removed
    (tmp_path / "predictions" / ".cryosiam_dask" / DEMO_STEM / "notes.txt").write_text("mine")
    cfg["cryosiam_dask"]["work_dir_cleanup"] = "all"
    cfg_path.write_text(yaml.safe_dump(cfg))
    [result] = instance_predict(load_config(cfg_path), client=client)
    assert result.report["maps_blocks_computed"] == 0 and _stores(tmp_path) == set()  # used, then removed
    assert not (tmp_path / "predictions" / ".cryosiam_dask" / f"{DEMO_STEM}.zarr").exists()  # the conversion
    assert (tmp_path / "predictions" / ".cryosiam_dask" / DEMO_STEM / "notes.txt").read_text() == "mine"
    assert (tmp_path / "predictions" / f"{DEMO_STEM}_instance_preds.h5").is_file()


def test_stores_in_use_by_another_run_are_not_collected(tmp_path, client):
    cfg_path = _case(tmp_path)
    instance_predict(load_config(cfg_path), client=client)
    first = _stores(tmp_path)
    work_dir = tmp_path / "predictions" / ".cryosiam_dask"
    code = (f"import time; from cryosiam_dask.run.locks import hold_work_dir; "
            f"hold_work_dir({str(work_dir)!r}, {DEMO_STEM!r}); print('held', flush=True); time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["parameters"]["network"]["threshold_foreground"] = 0.6
        cfg_path.write_text(yaml.safe_dump(cfg))
        instance_predict(load_config(cfg_path), client=client)  # shares the lock: runs, collects nothing
        assert first < _stores(tmp_path)
    finally:
        other.kill()
        other.wait()


# ------------------------------------------------------------------------------------------------- disk
def test_disk_full_while_writing_outputs(tmp_path, client, monkeypatch):
    from cryosiam_dask import outputs

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_instances_h5", full)
    with pytest.raises(TomogramsFailed) as e:
        instance_predict(load_config(_case(tmp_path)), client=client)
    [failure] = e.value.failed
    assert isinstance(failure.error, OutputError) and failure.stage == "outputs"
    message = failure.line()
    assert "disk full" in message and f"{DEMO_STEM}_instance_preds.h5" in message and "\n" not in message
    assert not list((tmp_path / "predictions").glob(f"{DEMO_STEM}_instance*"))


def test_disk_full_in_work_dir(tmp_path, client, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from cryosiam_dask.run import maps

    monkeypatch.setattr(maps, "write_region", full)
    with pytest.raises(TomogramsFailed) as e:
        instance_predict(load_config(_case(tmp_path)), client=client)
    [failure] = e.value.failed
    assert isinstance(failure.error, OutputError) and "disk full" in failure.line()
    assert "\n" not in failure.line()
    assert _markers(tmp_path, "maps") == 0


def test_unwritable_prediction_folder(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = _case(tmp_path, prediction_folder=str(tmp_path / "a_file" / "out"))
    with pytest.raises(OutputError, match=r"prediction_folder .*a_file/out is not writable"):
        instance_predict(load_config(cfg))


# -------------------------------------------------------------------------------------------- bad input
def _write_case(tmp: Path, volumes: dict[str, np.ndarray], mask: np.ndarray | None = None) -> Path:
    """The demo case of ``tmp`` (made if missing) pointed at a new data folder holding ``volumes``."""
    cfg = tmp / "config_instance.yaml"
    if not cfg.exists():
        _case(tmp)
    data = tmp / "data2"
    data.mkdir()
    for name, volume in volumes.items():
        write_mrc(data / f"{name}.mrc", volume, voxel_size=10.0)
    mask_folder = ""
    if mask is not None:
        (tmp / "masks2").mkdir()
        for name in volumes:
            write_mask_h5(tmp / "masks2" / f"{name}_preds.h5", mask)
        mask_folder = str(tmp / "masks2")
    text = yaml.safe_load(cfg.read_text())
    text.update(data_folder=str(data), mask_folder=mask_folder, test_files=None)
    cfg.write_text(yaml.safe_dump(text))
    return cfg


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_voxels_refused_with_count(tmp_path, client):
    _case(tmp_path)
    volume = _tomogram(tmp_path)
    volume[0, 0, :3] = np.nan
    volume[5, 5, 5] = np.inf
    cfg = _write_case(tmp_path, {"TS_nan": volume})
    with pytest.raises(TomogramsFailed) as e:  # found while streaming the file: that tomogram fails
        instance_predict(load_config(cfg), client=client)
    [failure] = e.value.failed
    assert isinstance(failure.error, InputFileError) and failure.stage == "inputs"
    assert re.search(r"TS_nan\.mrc: 4 NaN/inf voxel\(s\) of 131072; replace them", failure.line())
    assert not [
        p for p in (tmp_path / "predictions").iterdir() if not p.name.startswith(("cryosiam_dask_", "."))
    ]


def test_constant_tomogram_zero_instances_and_warning(tmp_path, client, caplog):
    cfg = _write_case(tmp_path, {"TS_const": np.full(SHAPE, 0.25, np.float32)})
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask"):
        [result] = instance_predict(load_config(cfg), client=client)
    assert result.n_instances == 0
    assert "TS_const.mrc: constant tomogram (every voxel 0.25)" in caplog.text
    assert "TS_const: 0 instances found" in caplog.text
    with h5py.File(tmp_path / "predictions" / "TS_const_instance_preds.h5", "r") as f:
        assert f["instances"].shape == SHAPE and not f["instances"][...].any()


def test_integer_and_half_mrc_modes_work(tmp_path, client):
    """Each MRC mode is read exactly: its instances equal those of the same values stored as float32."""
    _case(tmp_path)
    x = _tomogram(tmp_path)
    volumes = {
        "TS_int8": np.round(x * 100).astype(np.int8),
        "TS_int16": np.round(x * 1000).astype(np.int16),
        "TS_uint16": np.round(x * 1000).astype(np.uint16),
        "TS_float16": x.astype(np.float16),
    }
    volumes |= {f"{stem}-as-float32": v.astype(np.float32) for stem, v in volumes.items()}
    cfg = _write_case(tmp_path, volumes)
    text = yaml.safe_load(cfg.read_text())
    text["parameters"]["data"].update(min=0, max=1000)  # the integer modes' range: not clipped to [0, 1]
    cfg.write_text(yaml.safe_dump(text))
    results = {r.stem: r for r in instance_predict(load_config(cfg), client=client)}
    assert set(results) == set(volumes)
    for stem in ("TS_int8", "TS_int16", "TS_uint16", "TS_float16"):
        out = tmp_path / "predictions"
        labels = _outputs(out, stem)["instances"]
        as_float32 = _outputs(out, f"{stem}-as-float32")["instances"]
        assert np.array_equal(labels, as_float32), stem
    assert results["TS_int16"].n_instances > 0 and results["TS_uint16"].n_instances > 0


def test_smaller_than_patch_and_thin_slab_work(tmp_path, client):
    rng = np.random.default_rng(0)
    volumes = {
        "TS_small": rng.random((20, 24, 28), dtype=np.float32),  # patch is 32
        "TS_thin": rng.random((4, 64, 64), dtype=np.float32),
    }
    results = instance_predict(load_config(_write_case(tmp_path, volumes)), client=client)
    shapes = {r.stem: r.shape for r in results}
    assert shapes == {"TS_small": (20, 24, 28), "TS_thin": (4, 64, 64)}
    for stem, shape in shapes.items():
        with h5py.File(tmp_path / "predictions" / f"{stem}_instance_preds.h5", "r") as f:
            assert f["instances"].shape == shape


def test_all_zero_mask_zero_instances_and_warning(tmp_path, client, caplog):
    _case(tmp_path)
    cfg = _write_case(tmp_path, {"TS_nomask": _tomogram(tmp_path)}, mask=np.zeros(SHAPE, np.uint8))
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask"):
        [result] = instance_predict(load_config(cfg), client=client)
    assert result.n_instances == 0
    assert "TS_nomask: the lamella mask is all zero" in caplog.text
    assert (tmp_path / "predictions" / "TS_nomask_instance_regions.csv").is_file()


def test_input_far_outside_unit_range_warns(tmp_path, client, caplog):
    _case(tmp_path)
    volume = _tomogram(tmp_path) * 1000 - 200
    cfg = _write_case(tmp_path, {"TS_raw": volume.astype(np.float32)})
    with caplog.at_level(logging.WARNING, logger="cryosiam_dask"):
        instance_predict(load_config(cfg), client=client)
    lo, hi = float(volume.min()), float(volume.max())
    assert (
        f"TS_raw.mrc: values span [{lo:.4g}, {hi:.4g}] but parameters.data min/max are [0, 1]" in caplog.text
    )
    assert "set parameters.data.min/max to the tomogram's range" in caplog.text


def test_checkpoint_of_another_app_cli_exit_2(tmp_path):
    import torch

    cfg = _case(tmp_path)
    ckpt_path = Path(yaml.safe_load(cfg.read_text())["trained_model"])
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["state_dict"] = {
        k.replace("foreground_head", "semantic_head"): v for k, v in ckpt["state_dict"].items()
    }
    torch.save(ckpt, ckpt_path)
    run = _cli(cfg, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "is a CryoSiam semantic segmentation checkpoint, not an instance one" in errors[0]
    )
    assert not list((tmp_path / "predictions").glob("*.h5"))
    with pytest.raises(CheckpointError, match="semantic segmentation"):
        instance_predict(load_config(cfg))


def test_empty_test_files_and_same_tomogram_twice(tmp_path):
    cfg = _case(tmp_path, test_files=[])
    with pytest.raises(ConfigError, match="'test_files' is an empty list"):
        instance_predict(load_config(cfg))
    cfg = _case(tmp_path, test_files=[f"{DEMO_STEM}.mrc", f"{DEMO_STEM}.mrc"])
    with pytest.raises(ConfigError, match="lists the same tomogram twice"):
        instance_predict(load_config(cfg))
    assert not list((tmp_path / "predictions").glob("*.h5"))


# ------------------------------------------------------------------------------------------- concurrency
def _hold_lock(folder: Path, stem: str) -> subprocess.Popen:
    """Another process that holds the output lock of `stem` until killed."""
    code = (f"import sys, time; from cryosiam_dask.run.locks import acquire_lock; "
            f"acquire_lock({str(folder)!r}, {stem!r}); print('held', flush=True); time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"
    return other


def test_second_run_refuses_while_outputs_are_locked(tmp_path):
    cfg = _case(tmp_path)
    other = _hold_lock(tmp_path / "predictions", DEMO_STEM)
    try:
        lock = tmp_path / "predictions" / f".{DEMO_STEM}.cryosiam_dask.lock"
        with pytest.raises(OutputError) as e:
            instance_predict(load_config(cfg))
        message = str(e.value)
        assert str(lock) in message and f"pid {other.pid}" in message and "\n" not in message
        assert not list((tmp_path / "predictions").glob("*.h5"))
    finally:
        other.kill()
        other.wait()
    [result] = instance_predict(load_config(cfg))  # the lock died with its process: no stale lock to clear
    assert result.n_instances > 0


def test_lock_is_exclusive_and_released_when_the_holder_dies(tmp_path):
    first = locks.acquire_lock(tmp_path, "TS_01")
    with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
        locks.acquire_lock(tmp_path, "TS_01")
    assert locks.acquire_lock(tmp_path, "TS_02") != first  # one lock per output stem
    locks.release_lock(first)
    other = _hold_lock(tmp_path, "TS_01")
    with pytest.raises(OutputError, match=f"pid {other.pid}"):
        locks.acquire_lock(tmp_path, "TS_01")
    other.kill()
    other.wait()
    assert locks.acquire_lock(tmp_path, "TS_01") == first  # killed holder: the OS released its lock
    locks.release_lock(first)


@pytest.mark.slow
def test_two_concurrent_runs_do_not_corrupt_each_other(tmp_path, clean):
    cfg = _case(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != DIE_AFTER_ENV}
    cmd = [sys.executable, "-m", "cryosiam_dask", "instance_predict", "--config_file", str(cfg)]
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "predictions" / f".{DEMO_STEM}.cryosiam_dask.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    with pytest.raises(OutputError, match=f"pid {first.pid}"):
        instance_predict(load_config(cfg))
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-2000:]
    _assert_same(_outputs(tmp_path / "predictions"), clean)


# ------------------------------------------------------------------------------------ datasets (issue 20)
def _damage_one_chunk(path: Path) -> None:
    """Overwrite the bytes of one compressed chunk of ``labels``: the file opens and its shape reads."""
    with h5py.File(path, "r") as f:
        info = f["labels"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)


def test_one_unreadable_mask_costs_one_tomogram(tmp_path, clean, client):
    """Three tomograms, one lamella mask with a damaged chunk: the other two are written (identical to a
    clean run), one error line names the tomogram and the mask file, the summary, exit code 3; a rerun after
    the fix computes only the failed tomogram."""
    cfg_path = _case(tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["test_files"] = None
    cfg_path.write_text(yaml.safe_dump(cfg))
    src, mask = tmp_path / "data" / f"{DEMO_STEM}.mrc", tmp_path / "lamella" / f"{DEMO_STEM}_preds.h5"
    for stem in ("TS_bad", "TS_ok"):
        (tmp_path / "data" / f"{stem}.mrc").write_bytes(src.read_bytes())
        (tmp_path / "lamella" / f"{stem}_preds.h5").write_bytes(mask.read_bytes())
    bad_mask = tmp_path / "lamella" / "TS_bad_preds.h5"
    _damage_one_chunk(bad_mask)
    run = _cli(cfg_path)
    assert run.returncode == 3, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TS_bad (TS_bad.mrc)" in errors[0] and str(bad_mask) in errors[0], errors
    assert "Traceback" not in run.stderr
    assert "instance_predict: 2 done, 1 failed, 0 skipped" in run.stderr
    out = tmp_path / "predictions"
    for stem in (DEMO_STEM, "TS_ok"):
        _assert_same(_outputs(out, stem), clean)
    assert not list(out.glob("TS_bad_*"))
    (tmp_path / "lamella" / "TS_bad_preds.h5").write_bytes(mask.read_bytes())  # fixed
    results = {r.stem: r for r in instance_predict(load_config(cfg_path), client=client)}
    assert results["TS_bad"].report["maps_blocks_computed"] == BLOCKS
    for stem in (DEMO_STEM, "TS_ok"):
        assert results[stem].report["maps_blocks_computed"] == 0
        assert results[stem].report["windows_computed"] == 0
    _assert_same(_outputs(out, "TS_bad"), clean)


def test_validation_names_every_bad_input_file(tmp_path):
    cfg = _case(tmp_path)
    text = yaml.safe_load(cfg.read_text())
    text["test_files"] = None
    cfg.write_text(yaml.safe_dump(text))
    (tmp_path / "data" / "TS_garbage.mrc").write_bytes(b"not an mrc file")
    (tmp_path / "data" / "TS_nomask.mrc").write_bytes((tmp_path / "data" / f"{DEMO_STEM}.mrc").read_bytes())
    with pytest.raises(InputFileError) as e:
        instance_predict(load_config(cfg))
    message = str(e.value)
    assert message.startswith("2 of 3 tomograms have bad input files")
    assert "TS_garbage.mrc: not a valid MRC file" in message
    assert "TS_nomask_preds.h5: lamella mask not found" in message
    assert "\n" not in message
