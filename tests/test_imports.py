"""Every module imports on its own in a fresh interpreter (as a dask worker unpickling a task does).

A circular import only shows when the 'wrong' module is imported first; a worker that hits one dies on every
task, so each module is imported first in its own process here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cryosiam_dask"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module):
    proc = subprocess.run(
        [sys.executable, "-c", f"import cryosiam_dask.{module}"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
