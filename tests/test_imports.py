"""Import hygiene, checked once for the whole package.

- Every module imports on its own in a fresh interpreter (as a dask worker unpickling a task does): a circular
  import only shows when the 'wrong' module is imported first, and a worker that hits one dies on every task.
- ``import cryosiam_dask`` (and the CLI's ``--help``) loads neither torch nor cupy, cucim or dask-cuda, nor
  napari or Qt (the plugin's reader neither).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cryosiam_dask"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__main__"
)
HEAVY = ("torch", "monai", "cupy", "cucim", "dask_cuda", "napari", "magicgui", "qtpy", "PyQt6", "PyQt5",
         "PySide6")
QT_MODULES = ("cryosiam_dask.napari.tuning", "cryosiam_dask.napari.run_widget")
"""The plugin's widgets need the napari extra; every other module imports without it."""


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module):
    if module in QT_MODULES:
        pytest.importorskip("napari")
        pytest.importorskip("magicgui")
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


LIGHT = ["cryosiam_dask", "cryosiam_dask.config", "cryosiam_dask.cli", "cryosiam_dask.io",
         "cryosiam_dask.outputs", "cryosiam_dask.api", "cryosiam_dask.testing.synthetic",
         "cryosiam_dask.napari.reader", "cryosiam_dask.napari.session", "cryosiam_dask.napari.settings_file"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_load_no_torch_or_gpu_libraries(module):
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
