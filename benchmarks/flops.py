"""FLOPs per output voxel of the original network and of the prepared kept-range one (FlopCounterMode)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from cryosiam_dask.network.model import InstanceNetwork
from cryosiam_dask.network.prepared import Kept, PreparedNetwork, prepare


def _count_flops(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """Total FLOPs that FlopCounterMode counts for one ``fn(*args, **kwargs)`` call (inference mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def flops_per_output_voxel(model: InstanceNetwork, prepared: PreparedNetwork | None = None, *,
                           patch: int | Sequence[int] = 64, kept: Kept | None = None,
                           device: str = "meta") -> dict[str, float]:
    """FLOPs (``torch.utils.flop_counter.FlopCounterMode``: convolutions, 2 per MAC) per output voxel.

    Parameters
    ----------
    model : InstanceNetwork
        The original network (copied, not modified).
    prepared : PreparedNetwork or None, default None
        Its prepared version (None: ``prepare(model)``).
    patch : int or 3 ints, default 64
        Patch size (Z, Y, X).
    kept : Kept or None, default None
        Kept range of the patch; None: an interior patch, ``[p/4, 3p/4)`` per axis.
    device : str, default "meta"
        Where the counting forward runs ("meta": shapes only, no arithmetic).

    Returns
    -------
    dict
        ``full_per_patch_voxel`` and ``full_per_kept_voxel`` (original full-patch forward per patch voxel and
        per kept voxel), ``prepared_full_per_patch_voxel`` (prepared whole-patch forward),
        ``kept_per_kept_voxel`` (``forward_kept`` per kept voxel), ``ratio`` (full / kept, per kept voxel),
        ``patch_voxels``, ``kept_voxels``.
    """
    size = (patch,) * 3 if isinstance(patch, int) else tuple(int(p) for p in patch)
    if kept is None:
        kept = tuple((n // 4, n - n // 4) for n in size)  # type: ignore[assignment]
    if prepared is None:
        prepared = prepare(model)
    m = copy.deepcopy(model).to(device)
    pn = copy.deepcopy(prepared).to(device)
    x = torch.zeros((1, 1, *size), device=device)
    n_patch = size[0] * size[1] * size[2]
    n_kept = 1
    for lo, hi in kept:  # type: ignore[union-attr]
        n_kept *= hi - lo
    full = _count_flops(m, x)
    prepared_full = _count_flops(pn, x)
    kept_flops = _count_flops(pn.forward_kept, x, kept)
    return {
        "full_per_patch_voxel": full / n_patch,
        "full_per_kept_voxel": full / n_kept,
        "prepared_full_per_patch_voxel": prepared_full / n_patch,
        "kept_per_kept_voxel": kept_flops / n_kept,
        "ratio": full / kept_flops,
        "patch_voxels": float(n_patch),
        "kept_voxels": float(n_kept),
    }
