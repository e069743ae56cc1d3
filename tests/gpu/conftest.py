"""GPU tests (marker ``gpu``): skipped without cupy and a CUDA device, torch parts without ``torch.cuda``.

The CPU tests of this folder (no marker) run the device code paths on numpy/CPU in the normal suite.

The golden fixture is looked up in ``$CRYOSIAM_GOLDEN``, in the repository
(``tests/fixtures/cryosiam_golden``, which travels to the device machine with the working tree), beside the
checkout, then in ``benchmarks/gpu/golden``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_PLACES = [
    ROOT / "tests" / "fixtures" / "cryosiam_golden",  # in the repository: travels with the working tree
    ROOT.parent / "shared" / "fixtures" / "cryosiam_golden",
    ROOT / "benchmarks" / "gpu" / "golden",
]


@functools.cache
def cupy_unavailable() -> str | None:
    """Why cupy cannot run here, or None when it imports and sees at least one CUDA device."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return f"cupy not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cupy's CUDARuntimeError without a driver
        return f"cupy sees no CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "cupy sees no CUDA device"


@functools.cache
def torch_cuda_unavailable() -> str | None:
    """Why torch cannot run on CUDA here, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch not importable ({e})"
    return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``gpu`` item when neither cupy nor torch can reach a GPU (the fixtures skip finer)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = cupy_unavailable()
    if reason is None or torch_cuda_unavailable() is None:
        return
    mark = pytest.mark.skip(reason=f"no GPU: {reason}; {torch_cuda_unavailable()}")
    for item in gpu_items:
        item.add_marker(mark)


@pytest.fixture(scope="session")
def cp() -> ModuleType:
    """The cupy module (skip when cupy or a CUDA device is missing)."""
    reason = cupy_unavailable()
    if reason:
        pytest.skip(reason)
    import cupy

    return cupy


@pytest.fixture(scope="session")
def torch_cuda() -> ModuleType:
    """The torch module, with CUDA available (skip otherwise)."""
    reason = torch_cuda_unavailable()
    if reason:
        pytest.skip(reason)
    import torch

    return torch


@pytest.fixture(scope="session")
def golden() -> Path:
    """The golden CryoSiam case (overrides tests/conftest.py's: also where the device script puts it)."""
    env = os.environ.get("CRYOSIAM_GOLDEN")
    for place in ([Path(env)] if env else []) + GOLDEN_PLACES:
        if (place / "config_instance.yaml").is_file():
            return place
    places = [str(p) for p in GOLDEN_PLACES]
    pytest.skip(f"golden fixture folder not found in {places} (nor $CRYOSIAM_GOLDEN)")
