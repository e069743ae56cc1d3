"""The network over a chunked tomogram: one dask task per inference block, ``exact`` or ``fast`` tiling.

The inference blocks lie on a grid of the volume (:mod:`cryosiam_dask.network.tiling`: the kept-range grid
for ``exact``, at most :data:`~cryosiam_dask.network.tiling.BLOCK_RANGES` patches per axis; one core per
block for ``fast``), not on the storage chunks. For every block a per-axis *plan* lists the network windows
that write into it. Its task receives the tomogram blocks that those windows read
(``tomogram.to_delayed()``), assembles and normalises the input window, runs the network (loaded once per
worker process, :mod:`cryosiam_dask.network.runtime`) and writes the kept parts; the maps are rechunked to
the tomogram's chunks after. So both tilings give the same maps for any chunking: ``exact`` equals
:func:`cryosiam_dask.network.reference.predict_whole`, ``fast`` evaluates each voxel about once (see
:func:`~cryosiam_dask.network.tiling.fast_defaults`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import CheckpointError, InputFileError, ParameterError
from cryosiam_dask.network.normalize import normalize_block, volume_stats
from cryosiam_dask.network.runtime import (
    forward_batch_size,
    get_network,
    read_patch_size,
    run_network_batches,
    set_cuda_flags,
    set_torch_threads,
)
from cryosiam_dask.network.tiling import (
    BLOCK_RANGES,
    STRIDE,
    Plan,
    _exact_axis,
    _fast_axis,
    _reads,
    _segments,
    _window_slices,
    fast_defaults,
    fast_edges,
    inference_edges,
    owned_edges,
)

logger = logging.getLogger(__name__)

__all__ = [
    "InferenceBlock", "InferencePlan", "patch_skip_fraction", "plan_inference", "predict_block",
    "predict_maps", "run_block",
]


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
    batch_size: int, amp: str | None = None, mask: np.ndarray | None = None,
) -> np.ndarray:
    """Run the network over the windows of one chunk's plan and write their kept parts.

    Parameters
    ----------
    window : (Wz, Wy, Wx) ndarray of float32
        Normalised input covering every window of the plan (origin at the plan's window starts).
    model : torch.nn.Module
        See :func:`~cryosiam_dask.network.runtime.run_network`.
    plan : per-axis plan
        ``(w0, w1, [(start, length, lo, hi), ...])`` per axis, volume coordinates.
    chunk_start, chunk_shape : (z, y, x) ints
        The output chunk.
    batch_size : int
        Windows per forward pass (only windows of equal shape and kept range are batched).
    mask : (Cz, Cy, Cx) ndarray or None
        Lamella mask of the chunk: a window whose kept part lies wholly outside it is not evaluated (its
        output would be multiplied by zero).

    Returns
    -------
    (3, Cz, Cy, Cx) ndarray of float32
        Foreground, distance, boundary over the chunk.
    """
    out = np.zeros((3, *chunk_shape), np.float32)
    groups: dict[tuple, list] = {}  # (window shape, kept range in the window) -> jobs
    for job in itertools.product(*(pieces for _, _, pieces in plan)):
        dst = tuple(slice(lo - a, hi - a) for (_, _, lo, hi), a in zip(job, chunk_start, strict=True))
        if mask is not None and not np.any(mask[dst]):
            continue  # patch-level lamella skip
        kept = tuple((lo - s, hi - s) for (s, _, lo, hi) in job)
        groups.setdefault((tuple(p[1] for p in job), kept), []).append((job, dst))
    w0 = [ax[0] for ax in plan]
    for (_, kept), group in groups.items():
        batches = [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
        inputs = (np.stack([window[_window_slices(job, w0)] for job, _ in b]) for b in batches)
        # on CUDA the upload of batch i + 1 overlaps the forward pass of batch i
        for batch, preds in zip(batches, run_network_batches(model, inputs, kept=kept, amp=amp), strict=True):
            for (_, dst), pred in zip(batch, preds, strict=True):
                out[(slice(None), *dst)] = pred
    return out


# --------------------------------------------------------------------------- dask
def patch_skip_fraction(mask: da.Array, patch: ShapeZYX) -> float:
    """Fraction of the original's patches (``exact``) whose kept range lies wholly outside the mask.

    They are not evaluated: their output would be multiplied by zero.
    """
    grid = tuple(tuple(np.diff(owned_edges(int(n), int(p))).tolist())
                 for n, p in zip(mask.shape, patch, strict=True))
    empty = mask.rechunk(grid).map_blocks(lambda b: np.array([[[not np.any(b)]]]), chunks=(1, 1, 1),
                                          dtype=bool, meta=np.empty((0, 0, 0), bool))
    return float(empty.mean().compute())


def _validate(
    tomogram: Any, checkpoint_path: str | Path, tiling: str, data: Sequence[Any], batch_size: int,
    mask: da.Array | None, device: str, amp: str | None,
) -> None:
    if not isinstance(tomogram, da.Array) or tomogram.ndim != 3:
        raise ParameterError("tomogram", f"must be a 3-D dask array (z, y, x), got {type(tomogram).__name__} "
                             f"with shape {getattr(tomogram, 'shape', None)}")
    if not Path(checkpoint_path).is_file():
        raise InputFileError(f"checkpoint {checkpoint_path} does not exist")
    if tiling not in ("fast", "exact"):
        raise ParameterError("tiling", f"must be 'fast' or 'exact', got {tiling!r}")
    if len(data) != 4:
        raise ParameterError("data", f"must give (min, max, mean, std), got {data!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError("batch_size", f"must be a positive integer, got {batch_size!r}")
    if mask is not None and tuple(mask.shape) != tuple(tomogram.shape):
        raise ParameterError("mask", f"is {tuple(mask.shape)} but tomogram is {tuple(tomogram.shape)}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ParameterError("device", f"must be 'cpu' or 'cuda', got {device!r}")
    if amp not in (None, "bf16", "fp16"):
        raise ParameterError("amp", f"must be None, 'bf16' or 'fp16', got {amp!r}")


@dataclass(frozen=True)
class InferenceBlock:
    """One inference task: a block of the inference grid and the tomogram blocks its windows read.

    Attributes
    ----------
    index : (3,) tuple of int
        Position on the inference grid.
    start, shape : (z, y, x) ints
        The block in volume coordinates.
    plan : per-axis plan
        See :func:`predict_block`.
    reads : list of ((3,) int, (3,) int)
        ``(storage block index, its offset)`` of every tomogram block the windows read.
    """

    index: tuple[int, ...]
    start: ShapeZYX
    shape: ShapeZYX
    plan: Plan
    reads: list[tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def region(self) -> tuple[slice, ...]:
        """The block's slices in the volume."""
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.shape, strict=True))


@dataclass(frozen=True)
class InferencePlan:
    """The inference blocks of a tomogram and the keyword arguments every block's task shares.

    ``grid`` is the per-axis block sizes (a dask ``chunks`` tuple); ``task_kwargs`` go to :func:`run_block`.
    """

    blocks: list[InferenceBlock]
    grid: tuple[tuple[int, ...], ...]
    task_kwargs: dict[str, Any]


def run_block(
    blocks: Sequence[tuple[np.ndarray, tuple[int, ...]]], mask: np.ndarray | None, *, block: InferenceBlock,
    checkpoint_path: str, device: str, amp: str | None, tf32: bool, batch_size: int, size: ShapeZYX,
    shape: ShapeZYX, norm: dict[str, float],
) -> np.ndarray:
    """One inference block: zeros where the mask is all zero, else window -> network -> kept parts x mask.

    `blocks` are ``(tomogram block, offset)`` pairs (:attr:`InferenceBlock.reads`); returns
    (3, *shape) float32.
    """
    if mask is not None and not np.any(mask):
        return np.zeros((3, *block.shape), np.float32)
    if device == "cpu":
        set_torch_threads()
    else:
        set_cuda_flags(tf32=tf32)
    model = get_network(checkpoint_path, device)
    window = _assemble_window(blocks, block.plan, size, shape, norm)
    out = predict_block(window, model, block.plan, block.start, block.shape,
                        batch_size=forward_batch_size(device, batch_size), amp=amp,
                        mask=None if mask is None else np.asarray(mask))
    return out if mask is None else out * mask


def _norm(tomogram: da.Array, data: Sequence[float | None]) -> dict[str, float]:
    a_min, a_max, mean, std = data
    if mean is None or std is None:
        vmean, vstd = volume_stats(tomogram, a_min=a_min, a_max=a_max)
        mean, std = (vmean if mean is None else mean), (vstd if std is None else std)
        logger.info("volume statistics: mean %s, std %s", mean, std)
    return {"a_min": float(a_min), "a_max": float(a_max), "mean": float(mean), "std": float(std)}


def _block_edges(
    shape: ShapeZYX, chunks: tuple[tuple[int, ...], ...], patch: ShapeZYX, tiling: str, margin: int,
    window: int, block_ranges: int | None,
) -> list[list[int]]:
    """Inference-grid edges per axis: exact, the kept-range grid (each patch once); fast, a core per block."""
    if tiling == "exact":
        edges = [np.cumsum((0,) + tuple(c)).tolist() for c in chunks]
        return [inference_edges(n, e, p, block_ranges) for n, e, p in zip(shape, edges, patch, strict=True)]
    return [fast_edges(n, margin=margin, window=window) for n in shape]


def plan_inference(
    tomogram: da.Array, checkpoint_path: str | Path, *, tiling: str = "exact",
    data: tuple[float, float, float | None, float | None] = (0.0, 1.0, 0.0, 1.0), batch_size: int = 2,
    mask: da.Array | None = None, device: str = "cpu", amp: str | None = None,
    margin: int | None = None, window: int | None = None, patch_size: ShapeZYX | None = None,
    block_ranges: int | None = BLOCK_RANGES,
) -> InferencePlan:
    """The inference blocks of :func:`predict_maps` (same parameters), without building a graph.

    The blocks lie on a grid of the volume, not of the storage chunks, so the maps do not depend on the
    chunking; a caller that writes each block where it is computed runs each block once whatever the
    storage chunks (:mod:`cryosiam_dask.run.maps`).
    """
    _validate(tomogram, checkpoint_path, tiling, data, batch_size, mask, device, amp)
    norm = _norm(tomogram, data)
    patch = tuple(patch_size) if patch_size is not None else read_patch_size(str(checkpoint_path))
    if any(p % 4 for p in patch):
        raise CheckpointError(f"checkpoint {checkpoint_path}: patch_size {patch} is not a multiple of 4")
    default_margin, default_window = fast_defaults(max(patch))
    margin = default_margin if margin is None else margin
    window = default_window if window is None else window
    if tiling == "fast" and (margin < 0 or window <= 2 * margin or window % STRIDE):
        raise ParameterError(
            "fast_window", f"and fast_margin: need 0 <= margin < window/2 and a window that is a "
            f"multiple of {STRIDE}, got margin {margin}, window {window}"
        )
    shape = tuple(int(n) for n in tomogram.shape)
    size = tuple(max(n, p) for n, p in zip(shape, patch, strict=True))
    edges = [np.cumsum((0,) + tuple(c)).tolist() for c in tomogram.chunks]
    out_edges = _block_edges(shape, tomogram.chunks, patch, tiling, margin, window, block_ranges)
    blocks = []
    for idx in itertools.product(*(range(len(e) - 1) for e in out_edges)):
        bounds = [(e[i], e[i + 1]) for e, i in zip(out_edges, idx, strict=True)]
        if tiling == "exact":
            plan = tuple(_exact_axis(a, b, s, p) for (a, b), s, p in zip(bounds, size, patch, strict=True))
        else:
            plan = tuple(_fast_axis(a, b, s, margin=margin, window=window)
                         for (a, b), s in zip(bounds, size, strict=True))
        needed = [[j for j in range(len(e) - 1) if _reads(e[j], e[j + 1], w0, w1, s, n)]
                  for e, (w0, w1, _), s, n in zip(edges, plan, size, shape, strict=True)]
        reads = [(j, tuple(e[k] for e, k in zip(edges, j, strict=True))) for j in itertools.product(*needed)]
        blocks.append(InferenceBlock(idx, tuple(a for a, _ in bounds), tuple(b - a for a, b in bounds), plan,
                                     reads))
    kwargs = {"checkpoint_path": str(checkpoint_path), "device": device, "amp": amp,
              "tf32": tiling != "exact",
              "batch_size": batch_size, "size": size, "shape": shape, "norm": norm}
    return InferencePlan(blocks, tuple(tuple(np.diff(e).tolist()) for e in out_edges), kwargs)


def predict_maps(
    tomogram: da.Array, checkpoint_path: str | Path, *, tiling: str = "exact",
    data: tuple[float, float, float | None, float | None] = (0.0, 1.0, 0.0, 1.0), batch_size: int = 2,
    mask: da.Array | None = None, device: str = "cpu", amp: str | None = None,
    margin: int | None = None, window: int | None = None, patch_size: ShapeZYX | None = None,
    block_ranges: int | None = BLOCK_RANGES,
) -> tuple[da.Array, da.Array, da.Array]:
    """Network maps of a tomogram, lazily, one dask task per inference block.

    Parameters
    ----------
    tomogram : (Z, Y, X) dask.array.Array
        Raw tomogram (any real dtype); its chunks are the output chunks.
    checkpoint_path : str or Path
        CryoSiam instance checkpoint; each worker process loads it once (:func:`get_network`).
    tiling : {"fast", "exact"}, default "exact"
        ``exact`` equals :func:`predict_whole` for any chunking; ``fast`` computes each voxel about once,
        the same maps for any chunking too.
    data : (min, max, mean, std), default (0, 1, 0, 1)
        ``parameters.data``; a None mean or std is the volume's own (:func:`volume_stats`, computed now).
    batch_size : int, default 2
        ``hyper_parameters.batch_size``: windows per forward pass on CUDA (on CPU one window at a time,
        see :func:`~cryosiam_dask.network.runtime.forward_batch_size`).
    mask : (Z, Y, X) dask.array.Array of int8, optional
        Lamella mask; maps are multiplied by it, and chunks where it is all zero skip the network.
    device : {"cpu", "cuda"}, default "cpu"
    amp : {None, "bf16", "fp16"}, default None
        Autocast on the device. With ``tiling="exact"`` on CUDA, TF32 is switched off in the workers.
    margin, window : int, optional
        ``fast`` only: context voxels per side and maximal window edge (default :func:`fast_defaults` of the
        largest patch edge).
    patch_size : (z, y, x) ints, optional
        The checkpoint's patch size when the caller has read it already (else read from the checkpoint).
    block_ranges : int or None, default :data:`~cryosiam_dask.network.tiling.BLOCK_RANGES`
        ``exact`` only: most patches per axis in one task
        (:func:`~cryosiam_dask.network.tiling.inference_edges`); the maps do not depend on it.

    Returns
    -------
    foreground, distance, boundary : (Z, Y, X) dask.array.Array of float32
        Chunked like `tomogram`; foreground and boundary are probabilities, distance is raw (voxels).
        Each inference block feeds every storage chunk it overlaps: computing these arrays runs each block
        once per computation, but a graph that consumes storage chunks in separate chains may repeat it
        (the pipeline writes each block from its own task instead, :mod:`cryosiam_dask.run.maps`).
    """
    p = plan_inference(tomogram, checkpoint_path, tiling=tiling, data=data, batch_size=batch_size, mask=mask,
                       device=device, amp=amp, margin=margin, window=window, patch_size=patch_size,
                       block_ranges=block_ranges)
    source = tomogram.to_delayed()
    masks = None if mask is None else mask.rechunk(p.grid).to_delayed()
    task = dask.delayed(run_block, pure=True)
    nested = np.empty(tuple(len(c) for c in p.grid), object)
    for b in p.blocks:
        out = task([(source[j], offset) for j, offset in b.reads], None if masks is None else masks[b.index],
                   block=b, **p.task_kwargs)
        nested[b.index] = da.from_delayed(out, (3, *b.shape), dtype=np.float32,
                                          meta=np.empty((0, 0, 0, 0), np.float32))
    maps = da.block(nested.tolist())
    if p.grid != tuple(tomogram.chunks):
        maps = maps.rechunk(((3,), *tomogram.chunks))
    return maps[0], maps[1], maps[2]
