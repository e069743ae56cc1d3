"""Shared fixtures: the golden CryoSiam case, a tiny engineered checkpoint, an in-process dask client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

# Qt without a display (the napari plugin's tests): set before any test module loads Qt
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "cryosiam_golden"

# copick's import replaces the root logger's handlers (pytest's log capture with them): import it once here,
# through io.copick, which puts them back. Without the copick extra (ConfigError) the copick tests skip.
try:
    from cryosiam_dask.io.copick import import_copick

    import_copick()
except Exception:
    pass


@pytest.fixture(scope="session")
def golden() -> Path:
    """Folder of outputs produced by the original CryoSiam code (``tests/fixtures/cryosiam_golden``, with its
    README on how they were made); a missing folder fails every comparison instead of skipping it."""
    if not (GOLDEN / "golden.json").is_file():
        pytest.fail(f"golden fixture folder missing or incomplete: {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_maps(golden) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CryoSiam's raw maps of the golden case: foreground, distances, boundaries, (40, 61, 44) float32."""
    with h5py.File(golden / "predictions" / "TS_tiny_preds.h5", "r") as f:
        return f["foreground"][:], f["distances"][:], f["boundaries"][:]


@pytest.fixture(scope="session")
def golden_settings(golden) -> dict:
    """``postprocessing/settings.json``: each golden post-processing call, its kwargs and counts."""
    return json.loads((golden / "postprocessing" / "settings.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny CryoSiam-layout checkpoint (patch 32) with engineered weights that find particles."""
    from cryosiam_dask.testing.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_engineered.ckpt", arch="tiny",
                            patch_size=32, engineered=True)


@pytest.fixture
def client():
    """An in-process distributed client (threads, no subprocesses)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c
