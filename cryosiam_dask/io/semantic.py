"""CryoSiam's semantic foreground override: fg = ``isin(semantic labels, labels)``, read chunk by chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from cryosiam_dask.errors import InputFileError

__all__ = ["semantic_foreground"]


def _read_semantic(path: str, labels: tuple[int, ...], block_info: Any = None) -> np.ndarray:
    import h5py

    loc = block_info[None]["array-location"]
    with h5py.File(path, "r") as f:
        block = f["labels"][tuple(slice(a, b) for a, b in loc)]
    return np.isin(block, labels).astype(np.float32)


def semantic_foreground(path: Path, labels: tuple[int, ...], like: da.Array) -> da.Array:
    """fg = ``isin(semantic labels, labels)`` as float32, read chunk by chunk from ``path['labels']``.

    Raises
    ------
    InputFileError
        The file is missing or its labels are not of `like`'s shape.
    """
    import h5py

    if not path.exists():
        raise InputFileError(f"semantic prediction {path} does not exist")
    with h5py.File(path, "r") as f:
        shape = tuple(f["labels"].shape)
    if shape != tuple(like.shape):
        raise InputFileError(
            f"semantic prediction {path.name} is {shape} but tomogram is {tuple(like.shape)}"
        )
    return da.map_blocks(
        _read_semantic,
        str(path),
        tuple(labels),
        chunks=like.chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )
