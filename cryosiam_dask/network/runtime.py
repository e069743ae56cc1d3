"""The network inside a worker: loaded once per process, torch threads and TF32, one batched forward pass."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX

logger = logging.getLogger(__name__)

__all__ = ["cache_info", "get_network", "read_patch_size", "run_network", "set_tf32", "set_torch_threads"]

_CACHE: dict[tuple[str, int, str], Any] = {}
_LOCK = threading.Lock()
_LOADS = {"count": 0}


def _load_network(path: str, device: str) -> Any:
    """Build the network of a CryoSiam instance checkpoint on `device` (eval mode)."""
    from cryosiam_dask.network.checkpoint import load_checkpoint
    from cryosiam_dask.network.model import build_model

    return build_model(load_checkpoint(path), device=device)


def read_patch_size(path: str) -> ShapeZYX:
    """Patch size stored in the checkpoint (CryoSiam ignores the yaml's value)."""
    from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of

    return tuple(int(v) for v in patch_size_of(load_checkpoint(path)))  # type: ignore[return-value]


def get_network(checkpoint_path: str | Path, device: str = "cpu") -> Any:
    """Return the network of `checkpoint_path`, loaded once per process (cache key: path, mtime, device)."""
    path = Path(checkpoint_path).resolve()
    key = (str(path), path.stat().st_mtime_ns, device)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load_network(str(path), device)
            _LOADS["count"] += 1
            logger.debug("loaded %s on %s", path, device)
        return _CACHE[key]


def cache_info() -> dict[str, int]:
    """Number of network loads and cached networks in this process (a check that loading happens once)."""
    return {"loads": _LOADS["count"], "cached": len(_CACHE)}


def set_torch_threads() -> None:
    """Inside a dask worker, give torch the worker's thread count; elsewhere keep torch's default."""
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except (ImportError, ValueError):
        return
    import torch

    if torch.get_num_threads() != nthreads:
        torch.set_num_threads(nthreads)


def run_network(model: Any, batch: np.ndarray, *, amp: str | None = None) -> np.ndarray:
    """Run the network on a batch of windows.

    Parameters
    ----------
    model : torch.nn.Module
        ``forward(x[B, 1, D, H, W]) -> (foreground, distance, boundary)``, each ``[B, 1, D, H, W]``.
    batch : (B, D, H, W) ndarray of float32
        Normalised input windows.
    amp : {None, "bf16", "fp16"}, default None
        Autocast dtype (None: float32 throughout, as the original).

    Returns
    -------
    (B, 3, D, H, W) ndarray of float32
        Foreground probability, distance, boundary probability.
    """
    import torch

    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)[:, None]).to(device)
    with torch.inference_mode():
        if amp is None:
            maps = model(x)
        else:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
            with torch.autocast(device_type=device.type, dtype=dtype):
                maps = model(x)
        out = torch.cat([m.float() for m in maps], dim=1)
    return out.cpu().numpy()


def set_tf32(allow: bool) -> None:
    """TF32 convolutions and matmuls on or off in this process (off for ``exact``: TF32 differs by ~1e-3)."""
    import torch

    torch.backends.cudnn.allow_tf32 = allow  # torch's default is True for convolutions
    if not allow:
        torch.backends.cuda.matmul.allow_tf32 = False
