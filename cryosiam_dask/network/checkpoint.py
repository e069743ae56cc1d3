"""CryoSiam Lightning checkpoints, read without running code from the file, and their hyper-parameters.

``torch.load(weights_only=True)`` first, then, for real Lightning files whose optimizer/scheduler state names
other globals (torch 2.1's OneCycleLR pickles a bound method), an unpickler whose ``find_class`` returns
tensor-rebuild functions and plain containers as themselves and an inert stand-in class for every other
global, never importing or calling it (:mod:`cryosiam_dask.network.safe_pickle`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import CheckpointError, InputFileError
from cryosiam_dask.network.safe_pickle import _plain, _safe_torch_load

__all__ = ["BACKBONE_PREFIX", "HEADS_PREFIX", "HEAD_NAMES", "Checkpoint", "load_checkpoint", "patch_size_of",
           "validate_hparams", "detect_app"]

BACKBONE_PREFIX = "_model_backbone."
HEADS_PREFIX = "_model."
HEAD_NAMES = ("foreground_head", "distance_head", "boundary_head")

class Checkpoint(dict):
    """The two entries ``state_dict`` and ``hyper_parameters``; ``.path`` says which file they came from."""

    path: str = "checkpoint"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a CryoSiam Lightning checkpoint without running code from the file.

    Parameters
    ----------
    path : str or Path
        The ``.ckpt`` file.

    Returns
    -------
    dict
        ``{"state_dict": dict[str, torch.Tensor], "hyper_parameters": dict}`` and nothing else (optimizer and
        scheduler state are dropped). Non-tensor entries of the state_dict are dropped.

    Raises
    ------
    InputFileError
        The file does not exist.
    CheckpointError
        The file is not a readable torch checkpoint, or lacks ``state_dict`` / ``hyper_parameters``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"checkpoint {path} does not exist")
    raw = _safe_torch_load(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a Lightning checkpoint")
    parts = {key: _plain(raw.get(key)) for key in ("state_dict", "hyper_parameters")}
    for key, value in parts.items():
        if not isinstance(value, dict):
            found = sorted(map(str, raw))
            raise CheckpointError(f"checkpoint {path} has no '{key}' dict (found keys: {found})")
    state_dict = {str(k): v for k, v in parts["state_dict"].items() if isinstance(v, torch.Tensor)}
    ckpt = Checkpoint(state_dict=state_dict, hyper_parameters=parts["hyper_parameters"])
    ckpt.path = str(path)
    return ckpt



def name_of(ckpt: Mapping[str, Any]) -> str:
    return Path(getattr(ckpt, "path", "checkpoint")).name


def _get(ckpt: Mapping[str, Any], dotted: str) -> Any:
    node: Any = ckpt
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise CheckpointError(f"{name_of(ckpt)}: key {dotted} is missing")
        node = node[part]
    return node


def _int_list(ckpt: Mapping[str, Any], dotted: str, length: int | None = None) -> list[int]:
    value = _get(ckpt, dotted)
    ok = isinstance(value, list | tuple) and all(isinstance(v, int) and v > 0 for v in value)
    if not ok or (length is not None and len(value) != length):
        want = f"a list of {length} positive ints" if length else "a list of positive ints"
        raise CheckpointError(f"{name_of(ckpt)}: {dotted} should be {want}, found {value!r}")
    return [int(v) for v in value]


def validate_hparams(ckpt: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (backbone network dict, heads network dict) after checking every value the network needs."""
    bb_key = "hyper_parameters.backbone_config.parameters.network"
    hd_key = "hyper_parameters.config.parameters.network"
    bb, hd = dict(_get(ckpt, bb_key)), dict(_get(ckpt, hd_key))
    _int_list(ckpt, f"{bb_key}.num_layers", 4)
    _int_list(ckpt, f"{bb_key}.num_filters", 4)
    _int_list(ckpt, f"{hd_key}.filters", 2)
    positive = [f"{bb_key}.{k}" for k in ("fpn_channels", "dim", "dense_dim")]
    for key in positive + [f"{hd_key}.{k}" for k in ("dense_dim", "kernel_size")]:
        value = _get(ckpt, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{name_of(ckpt)}: {key} should be a positive int, found {value!r}")
    if not isinstance(_get(ckpt, f"{hd_key}.padding"), int):
        raise CheckpointError(f"{name_of(ckpt)}: {hd_key}.padding should be an int")
    if bb.get("block_type") not in ("basic", "bottleneck"):
        raise CheckpointError(f"{name_of(ckpt)}: {bb_key}.block_type should be 'basic' or 'bottleneck', "
                              f"found {bb.get('block_type')!r}")
    checks = [("spatial_dims", 3, bb), ("in_channels", 1, bb), ("decoder_type", "fpn", bb)]
    for key, want, net in checks + [("add_fpn_later_conv", False, bb), ("spatial_dims", 3, hd)]:
        if key in net and net[key] is not None and net[key] != want:
            raise CheckpointError(f"{name_of(ckpt)}: {key} = {net[key]!r} is not supported (only {want!r})")
    bb.setdefault("no_max_pool", True)
    return bb, hd


def detect_app(ckpt: Mapping[str, Any]) -> None:
    """Raise CheckpointError if the state_dict is that of another CryoSiam app."""
    keys = ckpt["state_dict"].keys()
    heads = [k[len(HEADS_PREFIX):] for k in keys if k.startswith(HEADS_PREFIX)]
    if any(k.startswith("semantic_head") for k in heads):  # SemanticHeads also has a distance_head
        app = "semantic segmentation"
    elif any(k.startswith(h + ".") for k in heads for h in HEAD_NAMES):
        return
    elif heads:
        app = "denoising/regression"
    elif any(k.startswith(BACKBONE_PREFIX) for k in keys):
        app = "pretraining-only (DenseSimSiam backbone without heads)"
    else:
        raise CheckpointError(f"{name_of(ckpt)} has no '{BACKBONE_PREFIX}' or '{HEADS_PREFIX}' tensors: "
                              "not a CryoSiam checkpoint")
    raise CheckpointError(f"{name_of(ckpt)} is a CryoSiam {app} checkpoint, not an instance one")


def patch_size_of(ckpt: Mapping[str, Any]) -> ShapeZYX:
    """Return the (z, y, x) patch size the network was trained with (``config.parameters.data.patch_size``).

    Raises
    ------
    CheckpointError
        Missing, not an int or a list of 3 ints, or not a positive multiple of 4 (the original's kept-range
        arithmetic needs p/4 to be an integer).
    """
    key = "hyper_parameters.config.parameters.data.patch_size"
    value = _get(ckpt, key)
    sizes = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(sizes, list | tuple) and len(sizes) == 3 and all(
        isinstance(p, int) and not isinstance(p, bool) and p > 0 and p % 4 == 0 for p in sizes)
    if not ok:
        raise CheckpointError(f"{name_of(ckpt)}: {key} should be an int or 3 ints, positive multiples of 4; "
                              f"found {value!r}")
    return (int(sizes[0]), int(sizes[1]), int(sizes[2]))
