"""Array-module dispatch: numpy/scipy for numpy chunks, cupy/cupyx for cupy chunks (cupy loaded when seen)."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

GPU_HINT = 'GPU support needs the gpu extra: pip install "cryosiam_dask[gpu]"'


def is_cupy(a: Any) -> bool:
    """Return True if `a` is a cupy array (without importing cupy)."""
    return type(a).__module__.startswith("cupy")


def get_xp(a: Any) -> ModuleType:
    """Return numpy or cupy, whichever owns `a`."""
    return sys.modules["cupy"] if is_cupy(a) else np


def get_ndimage(a: Any) -> ModuleType:
    """Return scipy.ndimage for numpy arrays, cupyx.scipy.ndimage for cupy arrays."""
    if is_cupy(a):
        import cupyx.scipy.ndimage as cndi

        return cndi
    import scipy.ndimage as ndi

    return ndi


def require_gpu() -> None:
    """Import cupy and cuCIM, or raise ImportError with one line naming the ``gpu`` extra.

    A run with ``device: cuda`` calls this before any work, so that a missing package is not found by a
    worker halfway through the run (there is no silent CPU fallback).
    """
    missing = []
    for name in ("cupy", "cucim"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"device 'cuda' needs {' and '.join(missing)}: {GPU_HINT}")


def to_device(a: Any, device: str) -> Any:
    """`a` on the device: a cupy array for ``"cuda"`` (one host-to-device copy), unchanged for ``"cpu"``.

    Parameters
    ----------
    a : numpy.ndarray or cupy.ndarray
    device : {"cpu", "cuda"}
    """
    if device != "cuda" or is_cupy(a):
        return a
    import cupy

    return cupy.asarray(a)


def to_numpy(a: Any) -> np.ndarray:
    """Return `a` as a numpy array (a device-to-host copy for cupy)."""
    return a.get() if is_cupy(a) else np.asarray(a)


def relabel_sequential(labels: Any, offset: int = 1) -> tuple[Any, Any, Any]:
    """``skimage.segmentation.relabel_sequential`` on numpy, cuCIM's on cupy (same arguments and results)."""
    if is_cupy(labels):
        from cucim.skimage.segmentation import relabel_sequential as relabel
    else:
        from skimage.segmentation import relabel_sequential as relabel
    return relabel(labels, offset=offset)
