"""End to end on a real SLURM (``tests/slurm/start_slurm.sh``), with the files of ``examples/slurm``.

- ``cryosiam_dask.sbatch`` (dask-jobqueue's SLURMRunner: scheduler, client and workers in one allocation);
- ``start_cluster.py`` + ``jobqueue.yaml`` (SLURMCluster worker jobs) and ``--scheduler-file``;
- a batch job cancelled mid-run (``scancel``) and resubmitted: it resumes, computes less, same outputs.

Each gives the instances of a local run of the same config, and SLURM's job history (``sacct -c``, from
``JobCompType=jobcomp/filetxt``) shows the jobs. The test node has 2 CPUs: the batch jobs are submitted with
``--overcommit`` (4 tasks on 1 CPU) and small memory, flags that override the template's ``#SBATCH`` lines.
Without SLURM, or with its controller down, every test here is skipped with the reason (they fail instead
when ``CRYOSIAM_DASK_REQUIRE_SLURM=1``, as in CI).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "slurm"
SBATCH = EXAMPLES / "cryosiam_dask.sbatch"
# 4 tasks (scheduler, client, 2 CPU workers of 1 thread) on the test node's 2 CPUs
SMALL_JOB = ["--ntasks=4", "--cpus-per-task=1", "--overcommit", "--mem-per-cpu=1500M", "--time=00:10:00"]
JOB_WAIT_S = 300
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


def _env() -> dict[str, str]:
    """The environment jobs inherit (sbatch exports it): this interpreter's bin first, our package first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("SLURM_JOB_ID", None)  # never inherit a job's identity from an outer allocation
    return env


def _config(base: Path, prediction_folder: Path, **settings) -> Path:
    """A copy of the demo config writing to `prediction_folder`, with `cryosiam_dask` settings."""
    cfg = yaml.safe_load(base.read_text())
    cfg["prediction_folder"] = str(prediction_folder)
    cfg["save_raw_predictions"] = False
    cfg["cryosiam_dask"] = {**cfg.get("cryosiam_dask", {}), "dashboard_address": None,
                            "output_formats": ["cryosiam"], **settings}
    prediction_folder.mkdir(parents=True, exist_ok=True)
    path = prediction_folder.parent / f"{prediction_folder.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _instances(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*_instance_preds.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = f["instances"][:]
    return out


def _assert_same_instances(run: Path, local: Path, n: int) -> None:
    got, want = _instances(run), _instances(local)
    assert len(want) == n and sorted(got) == sorted(want)
    for name in want:
        assert want[name].max() > 0, name  # the demo has particles
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _run_local(config: Path) -> None:
    command = ["cryosiam_dask", "instance_predict", "--config_file", str(config), "--n-workers", "2",
               "--threads-per-worker", "1"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _sbatch(cwd: Path, *args: str) -> str:
    (cwd / "logs").mkdir(exist_ok=True)  # the template's --output=logs/%x-%j.out
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(job_id: str, log: Path, *, until=None, timeout: float = JOB_WAIT_S) -> dict[str, str]:
    """Poll the job until it ends (or until `until(log text)` is true while it runs); its scontrol record."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = _job(job_id)
        if job.get("JobState") in ENDED:
            return job
        if until is not None and log.exists() and until(log.read_text(errors="replace")):
            return job
        time.sleep(0.2)
    subprocess.run(["scancel", job_id])
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"SLURM job {job_id} still {_job(job_id).get('JobState')} after {timeout} s; log:\n{tail}")


def _history(job_id: str) -> str:
    """The job's line in SLURM's job completion history (sacct -c reads JobCompLoc)."""
    for _ in range(50):  # the record is written when the job ends
        out = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "jobid,jobname,state,ncpus"],
                             capture_output=True, text=True).stdout
        if out.strip():
            return out.strip()
        time.sleep(0.2)
    pytest.fail(f"sacct -c has no record of job {job_id}")


def _computed_blocks(log: str) -> int:
    """Inference blocks a run computed: the denominators of its 'of N inference blocks lie outside' lines."""
    return sum(int(n) for n in re.findall(r"\d+ of (\d+) inference blocks lie outside", log))


@pytest.fixture(scope="module")
def one_tomogram(tmp_path_factory):
    from cryosiam_dask.demo import write_demo_inputs

    folder = tmp_path_factory.mktemp("slurm_demo")
    base = write_demo_inputs(folder / "demo", shape=(32, 64, 64), stem="TS_01")
    local = _config(base, folder / "local")
    _run_local(local)
    return folder, base, folder / "local"


@pytest.fixture(scope="module")
def four_tomograms(tmp_path_factory):
    from cryosiam_dask.demo import write_demo_inputs

    folder = tmp_path_factory.mktemp("slurm_resume")
    for seed, stem in enumerate(["TS_01", "TS_02", "TS_03", "TS_04"]):
        base = write_demo_inputs(folder / "demo", shape=(32, 96, 96), stem=stem, seed=seed)
    local = _config(base, folder / "local")
    _run_local(local)
    return folder, base, folder / "local"


def test_slurm_runner_batch_job_gives_the_local_instances(one_tomogram):
    folder, base, local = one_tomogram
    config = _config(base, folder / "runner")
    job_id = _sbatch(folder, *SMALL_JOB, str(SBATCH), str(config))
    log = folder / "logs" / f"cryosiam_dask-{job_id}.out"
    job = _wait(job_id, log)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert "cryosiam_dask: every tomogram written" in text
    # the ranks of the one allocation: scheduler, client, two CPU workers that joined
    for rank in ("rank 0 of 4: the dask scheduler", "rank 1 of 4: the dask client",
                 "rank 2 of 4: a CPU worker", "rank 3 of 4: a CPU worker", "2 workers joined"):
        assert rank in text, rank
    _assert_same_instances(folder / "runner", local, 1)
    assert not list((folder / "runner" / ".cryosiam_dask").glob("scheduler-*.json"))  # removed at the end
    assert f"{job_id}|cryosiam_dask|COMPLETED" in _history(job_id)


def test_slurm_cluster_worker_jobs_give_the_local_instances(one_tomogram):
    folder, base, local = one_tomogram
    config = _config(base, folder / "cluster")
    scheduler_file = folder / "cluster.json"
    cluster_log = folder / "start_cluster.log"
    cluster = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "start_cluster.py"), "--jobs", "2", "--scheduler-file",
         str(scheduler_file), "--jobqueue", str(EXAMPLES / "jobqueue.yaml"), "--cores", "1",
         "--memory", "1GB", "--wait", "240"],
        cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=cluster_log.open("w"), text=True,
    )
    try:
        line = cluster.stdout.readline()  # printed once the worker jobs have joined
        assert "2 worker(s) of 2 SLURM job(s) joined" in line, line + cluster_log.read_text()[-3000:]
        jobs = subprocess.run(["squeue", "-h", "-n", "cryosiam-worker", "-o", "%i %T"], capture_output=True,
                              text=True).stdout.split("\n")
        worker_jobs = [j.split()[0] for j in jobs if j.endswith("RUNNING")]
        assert len(worker_jobs) == 2, jobs
        done = subprocess.run(["cryosiam_dask", "instance_predict", "--config_file", str(config),
                               "--scheduler-file", str(scheduler_file)], env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "attached to existing scheduler" in done.stderr and "(2 workers)" in done.stderr
    finally:
        cluster.send_signal(signal.SIGTERM)  # start_cluster.py cancels its worker jobs
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            subprocess.run(["scancel", "-n", "cryosiam-worker"])
    assert cluster.returncode == 0, cluster_log.read_text()[-3000:]
    assert not scheduler_file.exists()
    _assert_same_instances(folder / "cluster", local, 1)
    # each worker job ran under SLURM (its log has the worker's start) and is in the history, now ended
    for job_id in worker_jobs:
        worker_log = folder / "logs" / "dask-jobs" / f"cryosiam-worker-{job_id}.err"
        assert "Start worker at" in worker_log.read_text()
        assert f"{job_id}|cryosiam-worker|" in _history(job_id)
    assert not subprocess.run(["squeue", "-h", "-n", "cryosiam-worker"], capture_output=True,
                              text=True).stdout.strip()


def test_batch_job_cancelled_mid_run_resumes_in_the_next_job(four_tomograms):
    folder, base, local = four_tomograms
    # one tomogram at a time, so that the cancel lands after the first is written and before the last
    config = _config(base, folder / "resumed", tomograms_in_flight=1)
    first = _sbatch(folder, *SMALL_JOB, str(SBATCH), str(config))
    log1 = folder / "logs" / f"cryosiam_dask-{first}.out"
    job = _wait(first, log1, until=lambda text: "done: " in text)
    assert job["JobState"] == "RUNNING", log1.read_text()[-4000:]
    subprocess.run(["scancel", first], check=True)
    job = _wait(first, log1)
    assert job["JobState"] == "CANCELLED", job
    written = len(_instances(folder / "resumed"))
    assert 1 <= written < 4, f"{written} tomograms written before the cancel"
    assert f"{first}|cryosiam_dask|CANCELLED" in _history(first)

    # the next job of the chain: it starts after the first ended, however it ended
    second = _sbatch(folder, f"--dependency=afterany:{first}", *SMALL_JOB, str(SBATCH), str(config))
    log2 = folder / "logs" / f"cryosiam_dask-{second}.out"
    job = _wait(second, log2)
    text2 = log2.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text2[-4000:]
    _assert_same_instances(folder / "resumed", local, 4)
    # the resumed job computed only what was missing: fewer inference blocks than a whole run
    whole = 4 * int(re.search(r"\d+ of (\d+) inference blocks lie outside",
                              log1.read_text()).group(1))
    assert "done in an earlier run" in text2
    assert 0 <= _computed_blocks(text2) < whole
    assert f"{second}|cryosiam_dask|COMPLETED" in _history(second)


def test_batch_job_exit_codes_are_the_runs(tmp_path):
    """The job's exit code is the run's: 3 when a tomogram failed (the other written), 2 when refused."""
    from cryosiam_dask.demo import write_demo_inputs

    for seed, stem in enumerate(["TS_01", "TS_bad"]):
        base = write_demo_inputs(tmp_path / "demo", shape=(32, 64, 64), stem=stem, seed=seed)
    bad_mask = tmp_path / "demo" / "lamella" / "TS_bad_preds.h5"
    with h5py.File(bad_mask, "r") as f:  # one damaged chunk: the file opens, a task fails reading it
        info = f["labels"].id.get_chunk_info(0)
    with open(bad_mask, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    config = _config(base, tmp_path / "failed")
    job_id = _sbatch(tmp_path, *SMALL_JOB, str(SBATCH), str(config))
    log = tmp_path / "logs" / f"cryosiam_dask-{job_id}.out"
    job = _wait(job_id, log)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "3:0"), text[-4000:]
    assert "error: TS_bad (TS_bad.mrc), stage maps" in text and "some tomograms failed" in text
    assert [p.name for p in (tmp_path / "failed").glob("*_instance_preds.h5")] == ["TS_01_instance_preds.h5"]

    cfg = yaml.safe_load(config.read_text())
    cfg["trained_model"] = str(tmp_path / "missing.ckpt")
    config.write_text(yaml.safe_dump(cfg))
    job_id = _sbatch(tmp_path, *SMALL_JOB, str(SBATCH), str(config))
    log = tmp_path / "logs" / f"cryosiam_dask-{job_id}.out"
    job = _wait(job_id, log)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log.read_text()[-4000:]
    assert "missing.ckpt' does not exist" in log.read_text()
