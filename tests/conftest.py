"""Shared fixtures: the golden CryoSiam outputs and an in-process dask client."""

from __future__ import annotations

from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "cryosiam_golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """Folder of outputs produced by the original CryoSiam code (../shared/fixtures/cryosiam_golden)."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixture folder not found: {GOLDEN}")
    return GOLDEN


@pytest.fixture
def client():
    """An in-process distributed client (threads, no subprocesses)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c
