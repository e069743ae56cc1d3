"""The `slurm` tests need a running SLURM: skipped with the reason without one (failed under CI's
``CRYOSIAM_DASK_REQUIRE_SLURM=1``)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _slurm_skip_reason() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (run tests/slurm/start_slurm.sh as root)"
    try:
        state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], capture_output=True, text=True,
                               timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e})"
    if state.returncode != 0 or state.stdout.strip() not in {"idle", "mix", "alloc"}:
        why = (state.stderr.strip().splitlines() or [state.stdout.strip() or "no node 'localhost'"])[-1]
        return f"the SLURM controller or node 'localhost' is not up ({why}); run tests/slurm/start_slurm.sh"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return 'dask-jobqueue is not installed (pip install "cryosiam_dask[slurm]")'
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = _slurm_skip_reason()
    if reason and os.environ.get("CRYOSIAM_DASK_REQUIRE_SLURM") == "1":  # CI: SLURM must be there
        pytest.fail(f"CRYOSIAM_DASK_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
