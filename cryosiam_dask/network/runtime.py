"""The network inside a worker: loaded once per process, torch threads, CUDA flags, batched forward passes.

CPU and CUDA share the code; what only CUDA does is kept in small functions:

- :func:`configure_cuda` (called through :func:`set_cuda_flags` by every CUDA task): cuDNN autotuning
  (``cudnn.benchmark``: the window shapes of a run are few and fixed, so each is tuned once per process) and
  TF32 off for ``exact`` (cuDNN convolutions and cuBLAS matmuls in true float32). :func:`cuda_flags` says what
  it sets without importing torch.
- :func:`run_network_batches`: a stream of batches through the prepared network's kept-range forward; on
  CUDA each batch goes through pinned (page-locked) host memory, and the upload of batch ``i + 1`` (on a
  copy stream) and the host work that makes it overlap the forward pass of batch ``i``; on CPU the numpy
  batch is used in place. :func:`run_network` is one batch of it.

``channels_last_3d`` weights and activations come from :func:`~cryosiam_dask.network.prepared.prepare`;
``amp`` (bf16/fp16 autocast) from the caller.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cryosiam_dask._types import ShapeZYX

logger = logging.getLogger(__name__)

__all__ = [
    "cache_info",
    "configure_cuda",
    "cuda_flags",
    "forward_batch_size",
    "get_network",
    "read_patch_size",
    "run_network",
    "run_network_batches",
    "set_cuda_flags",
    "set_torch_threads",
]

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


def forward_batch_size(device: str, batch_size: int) -> int:
    """Windows per forward pass on `device`: `batch_size` on CUDA, one on CPU.

    On CPU oneDNN already spreads one window over the worker's threads, so a batch buys no speed and
    multiplies the activations (real architecture, one 64³ patch, kept range only, 1 thread: 1.77 s and
    818 MiB peak RSS per patch at batch 1, 1.94 s and 1,041 MiB at batch 2, 1.96 s and 1,521 MiB at 4). The
    maps do not depend on the batch (eval mode).
    """
    return int(batch_size) if str(device).startswith("cuda") else 1


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


def _as_input(batch: np.ndarray) -> Any:
    """The (B, D, H, W) batch as a (B, 1, D, H, W) float32 CPU tensor on the numpy memory (no copy for a
    C-contiguous float32 batch)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)[:, None])


def _forward(model: Any, x: Any, kept: tuple[tuple[int, int], ...] | None, amp: str | None) -> Any:
    """(B, 3, kz, ky, kx) float32 maps over `kept` of a (B, 1, D, H, W) input tensor, on its device."""
    import torch

    with torch.inference_mode():
        return model.forward_kept(x, kept or tuple((0, int(n)) for n in x.shape[2:]), amp=amp)


def run_network(
    model: Any, batch: np.ndarray, *, kept: tuple[tuple[int, int], ...] | None = None, amp: str | None = None
) -> np.ndarray:
    """Run the prepared network on a batch of windows, returning only the kept range.

    Parameters
    ----------
    model : PreparedNetwork
        :class:`~cryosiam_dask.network.prepared.PreparedNetwork` (from :func:`get_network`): its
        ``forward_kept(x, kept, amp=)`` computes the layers after the encoder on the kept range only. The
        original network's own forward is :func:`cryosiam_dask.network.reference.run_original`.
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

    Notes
    -----
    One batch of :func:`run_network_batches` (on CUDA through pinned host memory and a side stream).
    """
    return next(run_network_batches(model, [batch], kept=kept, amp=amp))


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


_COPY_STREAMS = threading.local()


def _copy_stream(device: Any) -> Any:
    """This thread's side stream for host-to-device copies on `device` (created once)."""
    import torch

    streams = _COPY_STREAMS.__dict__.setdefault("streams", {})
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in streams:
        streams[key] = torch.cuda.Stream(device=device)
    return streams[key]


def run_network_batches(
    model: Any, batches: Iterable[np.ndarray], *, kept: tuple[tuple[int, int], ...] | None = None,
    amp: str | None = None,
) -> Iterator[np.ndarray]:
    """:func:`run_network` over a stream of batches of one window shape and kept range, pipelined on CUDA.

    Parameters
    ----------
    model, kept, amp
        As in :func:`run_network`.
    batches : iterable of (B, D, H, W) ndarray of float32
        Consumed lazily: batch ``i + 1`` is taken from the iterable (its host work, e.g. ``np.stack`` of
        windows, runs then) and uploaded while the GPU computes batch ``i``.

    Yields
    ------
    (B, 3, kz, ky, kx) ndarray of float32
        One result per batch, in order, equal to ``run_network(model, batch, kept=kept, amp=amp)``.

    Notes
    -----
    CUDA: each batch is copied to pinned host memory and uploaded with a non-blocking copy on a side stream
    (one per thread and device); the compute stream waits on an event for it, so the copy of ``i + 1``
    overlaps the forward pass of ``i``. The result of ``i`` is copied back when it is yielded. CPU: plain
    :func:`run_network` per batch (same results, nothing to overlap).
    """
    device = _device_of(model)
    if device.type != "cuda":
        for batch in batches:
            yield _forward(model, _as_input(batch), kept, amp).numpy()
        return
    import torch

    compute = torch.cuda.current_stream(device)
    copy = _copy_stream(device)

    def upload(batch: np.ndarray) -> tuple[Any, Any]:
        host = _as_input(batch).pin_memory()
        with torch.cuda.stream(copy):
            x = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(copy)
        return x, ready

    items = iter(batches)
    first = next(items, None)
    staged = None if first is None else upload(first)
    while staged is not None:
        x, ready = staged
        compute.wait_event(ready)
        x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        out = _forward(model, x, kept, amp)  # enqueued: the host goes on at once
        following = next(items, None)
        staged = None if following is None else upload(following)
        yield out.cpu().numpy()


def cuda_flags(*, tf32: bool, benchmark: bool = True) -> dict[str, bool]:
    """The ``torch.backends`` flags that :func:`configure_cuda` sets (no torch import).

    Parameters
    ----------
    tf32 : bool
        Allow TF32 in cuDNN convolutions (``fast``); False (``exact``) also switches it off for cuBLAS
        matmuls. TF32 keeps 10 mantissa bits: maps then differ from float32 ones by ~1e-3.
    benchmark : bool, default True
        cuDNN autotuning: the first call of each input shape times the convolution algorithms and keeps the
        fastest. A run has a handful of window shapes (one per kept range and batch size), each reused over
        every chunk, so the tuning is paid a few times per worker.

    Returns
    -------
    dict
        ``{"cudnn.benchmark": ..., "cudnn.allow_tf32": ..., ["cuda.matmul.allow_tf32": False]}``, attribute
        paths under ``torch.backends``.
    """
    flags = {"cudnn.benchmark": bool(benchmark), "cudnn.allow_tf32": bool(tf32)}
    if not tf32:
        flags["cuda.matmul.allow_tf32"] = False  # torch's default already; set against a changed process
    return flags


def configure_cuda(*, tf32: bool, benchmark: bool = True, backends: Any = None) -> dict[str, bool]:
    """Set the CUDA inference flags of :func:`cuda_flags` in this process; return what was set.

    Parameters
    ----------
    tf32, benchmark : bool
        See :func:`cuda_flags`.
    backends : object, optional
        Where to set them (default ``torch.backends``); tests pass a stand-in namespace.

    Returns
    -------
    dict
        The flags applied, as :func:`cuda_flags` returns them.

    Notes
    -----
    Only CUDA tasks call this (the flags do nothing on CPU, and CPU runs leave torch's defaults alone). It
    uses torch's long-standing ``allow_tf32`` flags, not the ``fp32_precision`` ones of torch >= 2.9: mixing
    the two raises when a flag is read, so one process must use one of them.
    """
    if backends is None:
        import torch

        backends = torch.backends
    flags = cuda_flags(tf32=tf32, benchmark=benchmark)
    for path, value in flags.items():
        owner, attr = path.rsplit(".", 1)
        setattr(operator.attrgetter(owner)(backends), attr, value)
    return flags


def set_cuda_flags(*, tf32: bool) -> dict[str, bool]:
    """Prepare a CUDA worker for a task: TF32 on (``fast``) or off (``exact``), and cuDNN autotuning on.

    Called by every CUDA task of :mod:`cryosiam_dask.network.predict` (never on CPU); see
    :func:`configure_cuda`. Returns the flags applied.
    """
    return configure_cuda(tf32=tf32)
