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
    """The prepared network of a CryoSiam instance checkpoint on `device`: BatchNorm folded, heads fused,
    ``channels_last_3d``, kept-range forward (:mod:`cryosiam_dask.network.prepared`)."""
    from cryosiam_dask.network.checkpoint import load_checkpoint
    from cryosiam_dask.network.model import build_model
    from cryosiam_dask.network.prepared import prepare

    return prepare(build_model(load_checkpoint(path), device=device), channels_last=True)


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


def run_network(
    model: Any, batch: np.ndarray, *, kept: tuple[tuple[int, int], ...] | None = None, amp: str | None = None
) -> np.ndarray:
    """Run the network on a batch of windows, returning only the kept range.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~cryosiam_dask.network.prepared.PreparedNetwork` (its ``forward_kept`` computes the
        layers after the encoder on the kept range only), or any module with
        ``forward(x[B, 1, D, H, W]) -> (foreground, distance, boundary)``, each ``[B, 1, D, H, W]``
        (the original network: the whole window is computed, then cropped).
    batch : (B, D, H, W) ndarray of float32
        Normalised input windows.
    kept : ((lo, hi), (lo, hi), (lo, hi)) or None, default None
        The range of the windows to return, in window coordinates (z, y, x); None: the whole window.
    amp : {None, "bf16", "fp16"}, default None
        Autocast dtype (None: float32 throughout, as the original).

    Returns
    -------
    (B, 3, kz, ky, kx) ndarray of float32
        Foreground probability, distance, boundary probability over `kept`.
    """
    import torch

    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)[:, None]).to(device)
    full = tuple((0, int(n)) for n in batch.shape[1:])
    with torch.inference_mode():
        if hasattr(model, "forward_kept"):
            return model.forward_kept(x, kept or full, amp=amp).cpu().numpy()
        if amp is None:
            maps = model(x)
        else:
            with torch.autocast(device_type=device.type, dtype=_AMP[amp](torch)):
                maps = model(x)
        out = torch.cat([m.float() for m in maps], dim=1)
    crop = tuple(slice(lo, hi) for lo, hi in (kept or full))
    return out[(slice(None), slice(None), *crop)].cpu().numpy()


_AMP = {"bf16": lambda torch: torch.bfloat16, "fp16": lambda torch: torch.float16}


def set_tf32(allow: bool) -> None:
    """TF32 convolutions and matmuls on or off in this process (off for ``exact``: TF32 differs by ~1e-3)."""
    import torch

    torch.backends.cudnn.allow_tf32 = allow  # torch's default is True for convolutions
    if not allow:
        torch.backends.cuda.matmul.allow_tf32 = False
