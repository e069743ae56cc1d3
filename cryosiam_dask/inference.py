"""Normalisation and the network, chunk by chunk: CryoSiam's tiling (``exact``) and a one-pass one (``fast``).

Both tilings share one engine. For every output chunk a per-axis *plan* (:mod:`cryosiam_dask.tiling`) lists
the network windows that write into it. One task per output chunk receives the tomogram blocks that its
windows read (``tomogram.to_delayed()``), assembles and normalises the input window, runs the network
(loaded once per worker process) and writes the kept parts. Outputs keep the tomogram's chunks. ``exact``
equals :func:`predict_whole` for any chunking; ``fast`` evaluates each voxel about once (see
:func:`~cryosiam_dask.tiling.fast_defaults`). The tiling names are re-exported here.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask._backend import get_xp
from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import ConfigError, InputFileError
from cryosiam_dask.tiling import (
    STRIDE,
    Plan,
    _exact_axis,
    _fast_axis,
    _reads,
    _segments,
    _window_slices,
    exact_patch_evaluations,
    fast_defaults,
    kept_ranges,
)

logger = logging.getLogger(__name__)

__all__ = [
    "STRIDE",
    "Plan",
    "cache_info",
    "exact_patch_evaluations",
    "fast_defaults",
    "get_network",
    "kept_ranges",
    "normalize_block",
    "predict_block",
    "predict_maps",
    "predict_whole",
    "run_network",
    "skipped_fraction",
    "volume_stats",
]


# --------------------------------------------------------------------------- normalisation
def normalize_block(x: Any, *, a_min: float, a_max: float, mean: float, std: float) -> Any:
    """Scale and normalise intensities exactly as CryoSiam's MONAI transforms, in float32.

    ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)`` then ``NormalizeIntensity(mean, std)``:
    ``(x - a_min) / (a_max - a_min)``, clipped to [0, 1], then ``(x - mean) / std``, each step in float32.
    With ``a_max == a_min`` only ``x - a_min`` is taken (no division, no clip); a ``std`` of 0 counts as 1.

    Parameters
    ----------
    x : (Z, Y, X) numpy or cupy array, any real dtype
        One block of the tomogram (not modified).
    a_min, a_max, mean, std : float
        ``parameters.data.min/max/mean/std`` of the config (use :func:`volume_stats` for null mean/std).

    Returns
    -------
    (Z, Y, X) array of float32, same array type as ``x``.
    """
    xp = get_xp(x)
    f32 = xp.float32
    y = xp.asarray(x).astype(f32, copy=True)
    y -= f32(a_min)
    if a_max - a_min != 0.0:
        y /= f32(a_max - a_min)
        xp.clip(y, f32(0), f32(1), out=y)
    y -= f32(mean)
    y /= f32(1.0 if std == 0 else std)
    return y


def volume_stats(tomogram: da.Array, *, a_min: float = 0.0, a_max: float = 1.0) -> tuple[float, float]:
    """Mean and population std of the scaled float32 volume (CryoSiam's values for a null mean/std).

    Parameters
    ----------
    tomogram : (Z, Y, X) dask.array.Array
        The raw tomogram.
    a_min, a_max : float, default 0.0 and 1.0
        Intensity range of the scaling step (see :func:`normalize_block`).

    Returns
    -------
    mean, std : float
        Computed with one dask reduction (float64 accumulation of the float32 scaled values).
    """
    scaled = tomogram.map_blocks(
        normalize_block, a_min=a_min, a_max=a_max, mean=0.0, std=1.0, dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )
    mean, std = dask.compute(scaled.mean(dtype=np.float64), scaled.std(dtype=np.float64))
    return float(mean), float(std)


# --------------------------------------------------------------------------- the network, cached per process
_CACHE: dict[tuple[str, int, str], Any] = {}
_LOCK = threading.Lock()
_LOADS = {"count": 0}


def _load_network(path: str, device: str) -> Any:
    """Build the network of a CryoSiam instance checkpoint on `device` (eval mode)."""
    from cryosiam_dask.model import build_model, load_checkpoint

    return build_model(load_checkpoint(path), device=device)


def _read_patch_size(path: str) -> ShapeZYX:
    """Patch size stored in the checkpoint (CryoSiam ignores the yaml's value)."""
    from cryosiam_dask.model import load_checkpoint, patch_size_of

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


def _set_torch_threads() -> None:
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


# --------------------------------------------------------------------------- per-chunk work
def _assemble_window(
    blocks: Sequence[tuple[np.ndarray, tuple[int, int, int]]], plan: Plan, size: ShapeZYX, shape: ShapeZYX,
    norm: dict[str, float],
) -> np.ndarray:
    """Build the normalised input window of a plan from tomogram blocks (SpatialPad zeros, far-end wrap)."""
    window = np.zeros([w1 - w0 for w0, w1, _ in plan], np.float32)
    segs = [_segments(w0, w1, s, n) for (w0, w1, _), s, n in zip(plan, size, shape, strict=True)]
    for block, offset in blocks:
        per_axis = []
        for axis_segs, o, m in zip(segs, offset, block.shape, strict=True):
            pairs = []
            for lo, hi, src in axis_segs:
                s0, s1 = max(src, o), min(src + hi - lo, o + m)
                if s0 < s1:
                    pairs.append((slice(lo + s0 - src, lo + s1 - src), slice(s0 - o, s1 - o)))
            per_axis.append(pairs)
        for combo in itertools.product(*per_axis):
            window[tuple(c[0] for c in combo)] = normalize_block(block[tuple(c[1] for c in combo)], **norm)
    return window


def predict_block(
    window: np.ndarray, model: Any, plan: Plan, chunk_start: ShapeZYX, chunk_shape: ShapeZYX, *,
    batch_size: int, amp: str | None = None,
) -> np.ndarray:
    """Run the network over the windows of one chunk's plan and write their kept parts.

    Parameters
    ----------
    window : (Wz, Wy, Wx) ndarray of float32
        Normalised input covering every window of the plan (origin at the plan's window starts).
    model : torch.nn.Module
        See :func:`run_network`.
    plan : per-axis plan
        ``(w0, w1, [(start, length, lo, hi), ...])`` per axis, volume coordinates.
    chunk_start, chunk_shape : (z, y, x) ints
        The output chunk.
    batch_size : int
        Windows per forward pass (only windows of equal shape are batched).

    Returns
    -------
    (3, Cz, Cy, Cx) ndarray of float32
        Foreground, distance, boundary over the chunk.
    """
    out = np.zeros((3, *chunk_shape), np.float32)
    jobs = list(itertools.product(*(pieces for _, _, pieces in plan)))
    groups: dict[tuple[int, ...], list] = {}
    for job in jobs:
        groups.setdefault(tuple(p[1] for p in job), []).append(job)
    w0 = [ax[0] for ax in plan]
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            inputs = np.stack([window[_window_slices(job, w0)] for job in batch])
            preds = run_network(model, inputs, amp=amp)
            for job, pred in zip(batch, preds, strict=True):
                dst = tuple(slice(lo - a, hi - a)
                            for (_, _, lo, hi), a in zip(job, chunk_start, strict=True))
                src = tuple(slice(lo - s, hi - s) for (s, _, lo, hi) in job)
                out[(slice(None), *dst)] = pred[(slice(None), *src)]
    return out


def _chunk_task(blocks, mask, *, checkpoint_path, device, amp, tf32, batch_size, plan, size, shape, norm,
                chunk_start, chunk_shape):
    """One output chunk: zeros where the mask is all zero, else window → network → kept parts × mask."""
    if mask is not None and not np.any(mask):
        return np.zeros((3, *chunk_shape), np.float32)
    if device == "cpu":
        _set_torch_threads()
    else:
        _set_tf32(tf32)
    model = get_network(checkpoint_path, device)
    window = _assemble_window(blocks, plan, size, shape, norm)
    out = predict_block(window, model, plan, chunk_start, chunk_shape, batch_size=batch_size, amp=amp)
    return out if mask is None else out * mask


# --------------------------------------------------------------------------- whole volume (the original)
def predict_whole(
    volume: np.ndarray, model: Any, *, patch_size: ShapeZYX, batch_size: int, amp: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CryoSiam's in-memory tiling of a whole normalised volume (the reference and the benchmark baseline).

    SpatialPad with zeros at the far end of dims smaller than the patch; patch starts every p/2 (all of
    them evaluated, row-major, z outermost, in batches of `batch_size`); reads past the far end wrap around;
    the four stitching rules of :func:`kept_ranges`, later writes winning; crop to the input shape.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Normalised tomogram (see :func:`normalize_block`).
    model : torch.nn.Module
        See :func:`run_network`.
    patch_size : (pz, py, px) ints, multiples of 4
    batch_size : int

    Returns
    -------
    foreground, distance, boundary : (Z, Y, X) ndarray of float32
    """
    if volume.ndim != 3 or len(patch_size) != 3 or any(p % 4 for p in patch_size):
        raise ConfigError(f"need a 3-D volume and a patch size of multiples of 4, got volume "
                          f"{volume.shape} and patch_size {tuple(patch_size)}")
    shape = volume.shape
    size = tuple(max(n, p) for n, p in zip(shape, patch_size, strict=True))
    vol = np.pad(np.asarray(volume, np.float32), [(0, s - n) for s, n in zip(size, shape, strict=True)])
    vol = np.pad(vol, [(0, p) for p in patch_size], mode="wrap")
    out = np.zeros((3, *size), np.float32)
    starts = [range(0, s, int(round(0.5 * p))) for s, p in zip(size, patch_size, strict=True)]
    keep = [{c0: (lo, hi) for c0, lo, hi in kept_ranges(s, p)} for s, p in zip(size, patch_size, strict=True)]
    patches = list(itertools.product(*starts))
    for i in range(0, len(patches), batch_size):
        batch = patches[i:i + batch_size]
        inputs = np.stack([vol[tuple(slice(c, c + p) for c, p in zip(c0, patch_size, strict=True))]
                           for c0 in batch])
        preds = run_network(model, inputs, amp=amp)
        for c0, pred in zip(batch, preds, strict=True):
            if any(c not in k for c, k in zip(c0, keep, strict=True)):
                continue
            ranges = [k[c] for c, k in zip(c0, keep, strict=True)]
            dst = tuple(slice(lo, hi) for lo, hi in ranges)
            src = tuple(slice(lo - c, hi - c) for (lo, hi), c in zip(ranges, c0, strict=True))
            out[(slice(None), *dst)] = pred[(slice(None), *src)]
    crop = (slice(None), *(slice(0, n) for n in shape))
    fg, dist, bnd = out[crop]
    return fg, dist, bnd


# --------------------------------------------------------------------------- dask
def skipped_fraction(mask: da.Array, chunks: tuple[tuple[int, ...], ...] | None = None) -> float:
    """Fraction of chunks whose mask is all zero (they skip the network).

    Parameters
    ----------
    mask : (Z, Y, X) dask.array.Array
        Lamella mask, 0 = outside.
    chunks : tuple of tuples, optional
        Chunking of the outputs (default: the mask's own).
    """
    if chunks is not None:
        mask = mask.rechunk(chunks)
    empty = mask.map_blocks(lambda b: np.array([[[not np.any(b)]]]), chunks=(1, 1, 1), dtype=bool,
                            meta=np.empty((0, 0, 0), bool))
    return float(empty.mean().compute())


def _validate(tomogram, checkpoint_path, tiling, data, batch_size, mask, device, amp):
    if not isinstance(tomogram, da.Array) or tomogram.ndim != 3:
        raise ConfigError(f"tomogram must be a 3-D dask array (z, y, x), got {type(tomogram).__name__} "
                          f"with shape {getattr(tomogram, 'shape', None)}")
    if not Path(checkpoint_path).is_file():
        raise InputFileError(f"checkpoint {checkpoint_path} does not exist")
    if tiling not in ("fast", "exact"):
        raise ConfigError(f"cryosiam_dask.tiling must be 'fast' or 'exact', got {tiling!r}")
    if len(data) != 4:
        raise ConfigError(f"parameters.data must give (min, max, mean, std), got {data!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"hyper_parameters.batch_size must be a positive integer, got {batch_size!r}")
    if mask is not None and tuple(mask.shape) != tuple(tomogram.shape):
        raise ConfigError(f"mask is {tuple(mask.shape)} but tomogram is {tuple(tomogram.shape)}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")


def predict_maps(
    tomogram: da.Array, checkpoint_path: str | Path, *, tiling: str = "fast",
    data: tuple[float, float, float | None, float | None] = (0.0, 1.0, 0.0, 1.0), batch_size: int = 2,
    mask: da.Array | None = None, device: str = "cpu", amp: str | None = None,
    margin: int | None = None, window: int | None = None,
) -> tuple[da.Array, da.Array, da.Array]:
    """Network maps of a tomogram, lazily, one dask task per chunk.

    Parameters
    ----------
    tomogram : (Z, Y, X) dask.array.Array
        Raw tomogram (any real dtype); its chunks are the output chunks.
    checkpoint_path : str or Path
        CryoSiam instance checkpoint; each worker process loads it once (:func:`get_network`).
    tiling : {"fast", "exact"}, default "fast"
        ``exact`` equals :func:`predict_whole` for any chunking; ``fast`` computes each voxel about once.
    data : (min, max, mean, std), default (0, 1, 0, 1)
        ``parameters.data``; a None mean or std is the volume's own (:func:`volume_stats`, computed now).
    batch_size : int, default 2
        ``hyper_parameters.batch_size``: windows per forward pass.
    mask : (Z, Y, X) dask.array.Array of int8, optional
        Lamella mask; maps are multiplied by it, and chunks where it is all zero skip the network.
    device : {"cpu", "cuda"}, default "cpu"
    amp : {None, "bf16", "fp16"}, default None
        Autocast on the device. With ``tiling="exact"`` on CUDA, TF32 is switched off in the workers.
    margin, window : int, optional
        ``fast`` only: context voxels per side and maximal window edge (default :func:`fast_defaults` of the
        largest patch edge).

    Returns
    -------
    foreground, distance, boundary : (Z, Y, X) dask.array.Array of float32
        Chunked like `tomogram`; foreground and boundary are probabilities, distance is raw (voxels).
    """
    _validate(tomogram, checkpoint_path, tiling, data, batch_size, mask, device, amp)
    a_min, a_max, mean, std = data
    if mean is None or std is None:
        vmean, vstd = volume_stats(tomogram, a_min=a_min, a_max=a_max)
        mean, std = (vmean if mean is None else mean), (vstd if std is None else std)
        logger.info("volume statistics: mean %s, std %s", mean, std)
    norm = {"a_min": float(a_min), "a_max": float(a_max), "mean": float(mean), "std": float(std)}
    patch = _read_patch_size(str(checkpoint_path))
    if any(p % 4 for p in patch):
        raise ConfigError(f"checkpoint {checkpoint_path}: patch_size {patch} is not a multiple of 4")
    default_margin, default_window = fast_defaults(max(patch))
    margin = default_margin if margin is None else margin
    window = default_window if window is None else window
    if tiling == "fast" and (margin < 0 or window <= 2 * margin or window % STRIDE):
        raise ConfigError(
            f"cryosiam_dask.fast_window/fast_margin: need 0 <= margin < window/2 and a window that is a "
            f"multiple of {STRIDE}, got margin {margin}, window {window}"
        )
    shape = tuple(int(n) for n in tomogram.shape)
    size = tuple(max(n, p) for n, p in zip(shape, patch, strict=True))
    edges = [np.cumsum((0,) + tuple(c)).tolist() for c in tomogram.chunks]
    blocks = tomogram.to_delayed()
    masks = None if mask is None else mask.rechunk(tomogram.chunks).to_delayed()
    task = dask.delayed(_chunk_task, pure=True)
    nested = np.empty(blocks.shape, object)
    for idx in np.ndindex(*blocks.shape):
        bounds = [(e[i], e[i + 1]) for e, i in zip(edges, idx, strict=True)]
        if tiling == "exact":
            plan = tuple(_exact_axis(a, b, s, p) for (a, b), s, p in zip(bounds, size, patch, strict=True))
        else:
            plan = tuple(_fast_axis(a, b, s, margin=margin, window=window)
                         for (a, b), s in zip(bounds, size, strict=True))
        needed = [[j for j in range(len(e) - 1) if _reads(e[j], e[j + 1], w0, w1, s, n)]
                  for e, (w0, w1, _), s, n in zip(edges, plan, size, shape, strict=True)]
        inputs = [(blocks[j], tuple(e[k] for e, k in zip(edges, j, strict=True)))
                  for j in itertools.product(*needed)]
        chunk_start = tuple(a for a, _ in bounds)
        chunk_shape = tuple(b - a for a, b in bounds)
        out = task(inputs, None if masks is None else masks[idx], checkpoint_path=str(checkpoint_path),
                   device=device, amp=amp, tf32=tiling != "exact", batch_size=batch_size, plan=plan,
                   size=size, shape=shape,
                   norm=norm, chunk_start=chunk_start, chunk_shape=chunk_shape)
        nested[idx] = da.from_delayed(out, (3, *chunk_shape), dtype=np.float32,
                                      meta=np.empty((0, 0, 0, 0), np.float32))
    maps = da.block(nested.tolist())
    return maps[0], maps[1], maps[2]


def _set_tf32(allow: bool) -> None:
    """TF32 convolutions and matmuls on or off in this process (off for ``exact``: TF32 differs by ~1e-3)."""
    import torch

    torch.backends.cudnn.allow_tf32 = allow  # torch's default is True for convolutions
    if not allow:
        torch.backends.cuda.matmul.allow_tf32 = False
