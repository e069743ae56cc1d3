"""CryoSiam checkpoints -> the instance network (DenseSimSiam backbone + InstanceHeads), loaded safely.

The network is rebuilt from the checkpoint's own ``hyper_parameters`` (never from the YAML):
the backbone from ``hyper_parameters.backbone_config.parameters.network`` and the heads from
``hyper_parameters.config.parameters.network``. Only the inference path exists as modules (encoder convs,
FPN decoder, dense projector, three heads); ``global_*``, ``predictor``, ``level_*`` and ``encoder.fc``
tensors of the file are ignored.

Checkpoints are read without running code from the file: ``torch.load(weights_only=True)`` first, then, for
real Lightning files whose optimizer/scheduler state names other globals (torch 2.1's OneCycleLR pickles a
bound method), an unpickler whose ``find_class`` returns tensor-rebuild functions and plain containers as
themselves and an inert stand-in class for every other global, never importing or calling it (the private
module :mod:`cryosiam_dask._safe_pickle`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cryosiam_dask._safe_pickle import _plain, _safe_torch_load
from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.errors import CheckpointError, InputFileError

logger = logging.getLogger(__name__)

__all__ = [
    "FPNDecoder",
    "InstanceHeads",
    "InstanceNetwork",
    "build_model",
    "count_parameters",
    "load_checkpoint",
    "patch_size_of",
]

BACKBONE_PREFIX = "_model_backbone."
HEADS_PREFIX = "_model."
HEAD_NAMES = ("foreground_head", "distance_head", "boundary_head")


# ----------------------------------------------------------------------------------------------- modules
class FPNDecoder(nn.Module):
    """Top-down FPN: 1x1 laterals (with bias) summed with trilinear upsampling, back to res2's resolution.

    ``layer1`` acts on res5, ``layer2`` on res4, ``layer3`` on res3, ``layer4`` on res2 (CryoSiam's names).
    """

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        c2, c3, c4, c5 = in_channels
        self.layer4 = nn.Conv3d(c2, out_channels, 1)  # defined in the file's key order
        self.layer3 = nn.Conv3d(c3, out_channels, 1)
        self.layer2 = nn.Conv3d(c4, out_channels, 1)
        self.layer1 = nn.Conv3d(c5, out_channels, 1)

    def forward(
        self, res2: torch.Tensor, res3: torch.Tensor, res4: torch.Tensor, res5: torch.Tensor
    ) -> torch.Tensor:
        """Return the full-resolution FPN map [B, fpn_channels, *res2.shape[2:]]."""
        out = self.layer1(res5)
        for lateral_conv, feature in ((self.layer2, res4), (self.layer3, res3), (self.layer4, res2)):
            lateral = lateral_conv(feature)
            out = F.interpolate(out, size=lateral.shape[2:], mode="trilinear", align_corners=False) + lateral
        return out


def _conv_bn_relu_head(in_channels: int, filters: list[int], kernel_size: int, padding: int) -> nn.Sequential:
    """Conv-BN-ReLU-Conv-BN-ReLU-Conv(->1), all convs with bias (CryoSiam's InstanceHeads layout)."""
    f0, f1 = filters
    return nn.Sequential(
        nn.Conv3d(in_channels, f0, kernel_size, padding=padding),
        nn.BatchNorm3d(f0),
        nn.ReLU(),
        nn.Conv3d(f0, f1, kernel_size, padding=padding),
        nn.BatchNorm3d(f1),
        nn.ReLU(),
        nn.Conv3d(f1, 1, kernel_size, padding=padding),
    )


class InstanceHeads(nn.Module):
    """Three independent heads on the dense embedding z: foreground, distance and boundary logits."""

    def __init__(self, dense_dim: int, filters: list[int], kernel_size: int, padding: int) -> None:
        super().__init__()
        self.foreground_head = _conv_bn_relu_head(dense_dim, filters, kernel_size, padding)
        self.distance_head = _conv_bn_relu_head(dense_dim, filters, kernel_size, padding)
        self.boundary_head = _conv_bn_relu_head(dense_dim, filters, kernel_size, padding)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the raw (pre-activation) foreground, distance and boundary maps, each [B, 1, D, H, W]."""
        return self.foreground_head(z), self.distance_head(z), self.boundary_head(z)


class _Backbone(nn.Module):
    """The inference path of CryoSiam's DenseSimSiam: MONAI ResNet encoder, FPN decoder, dense projector."""

    def __init__(self, net: Mapping[str, Any]) -> None:
        super().__init__()
        from monai.networks.nets import ResNet  # heavy import, only when a model is built

        block_type = net["block_type"]
        filters = list(net["num_filters"])
        expansion = 4 if block_type == "bottleneck" else 1
        fpn, dense_dim = int(net["fpn_channels"]), int(net["dense_dim"])
        # MONAI defaults kept on purpose: conv1 k7 s1 p3 no bias, shortcut "B", bias_downsample=True;
        # `act` reaches only the stem (blocks use MONAI's default ReLU).
        self.encoder = ResNet(
            block_type,
            list(net["num_layers"]),
            filters,
            n_input_channels=int(net.get("in_channels", 1)),
            no_max_pool=bool(net["no_max_pool"]),
            num_classes=int(net["dim"]),
            spatial_dims=3,
            act=("relu", {"inplace": False}),
        )
        self.encoder.fc = None  # not on the inference path (duplicated as global_projector.6 in the file)
        self.decoder = FPNDecoder([f * expansion for f in filters], fpn)
        self.projector = nn.Sequential(
            nn.Conv3d(fpn, fpn, 1, bias=False),
            nn.BatchNorm3d(fpn),
            nn.ReLU(),
            nn.Conv3d(fpn, fpn, 1, bias=False),
            nn.BatchNorm3d(fpn),
            nn.ReLU(),
            nn.Conv3d(fpn, dense_dim, 1),
            nn.BatchNorm3d(dense_dim, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the dense embedding z [B, dense_dim, D, H, W]."""
        enc = self.encoder
        x = enc.act(enc.bn1(enc.conv1(x)))
        if not enc.no_max_pool:
            x = enc.maxpool(x)
        res2 = enc.layer1(x)
        res3 = enc.layer2(res2)
        res4 = enc.layer3(res3)
        res5 = enc.layer4(res4)
        return self.projector(self.decoder(res2, res3, res4, res5))


class InstanceNetwork(nn.Module):
    """CryoSiam's instance network: ``backbone.forward_predict`` then ``InstanceHeads``, sigmoids applied.

    Built by :func:`build_model`, in eval mode. Spatial sizes are best multiples of 8 (res5 is at 1/8
    resolution). Other sizes run too, with the same ops as the original (so with the same result): each
    stride-2 conv gives ceil(n/2) voxels and the FPN upsamples to each lateral's exact size, so the outputs
    always have the input's size, but the upsampling ratios are then not exactly 2 (e.g. a 36³ patch, p being
    only required to be a multiple of 4, has res5 of 5³).
    """

    def __init__(self, backbone_net: Mapping[str, Any], heads_net: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = _Backbone(backbone_net)
        self.heads = InstanceHeads(
            int(heads_net["dense_dim"]),
            [int(f) for f in heads_net["filters"]],
            int(heads_net["kernel_size"]),
            int(heads_net["padding"]),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the network on a batch of patches.

        Parameters
        ----------
        x : (B, 1, D, H, W) torch.Tensor of float32
            Normalised patches, axes (batch, channel, z, y, x).

        Returns
        -------
        foreground, distance, boundary : (B, 1, D, H, W) torch.Tensor of float32
            Foreground and boundary probabilities (sigmoid applied), distance raw (signed, in voxels).
        """
        fg, dist, bnd = self.heads(self.backbone(x))
        return torch.sigmoid(fg), dist, torch.sigmoid(bnd)


# ----------------------------------------------------------------------------------------------- loading
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



def _name(ckpt: Mapping[str, Any]) -> str:
    return Path(getattr(ckpt, "path", "checkpoint")).name


def _get(ckpt: Mapping[str, Any], dotted: str) -> Any:
    node: Any = ckpt
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise CheckpointError(f"{_name(ckpt)}: key {dotted} is missing")
        node = node[part]
    return node


def _int_list(ckpt: Mapping[str, Any], dotted: str, length: int | None = None) -> list[int]:
    value = _get(ckpt, dotted)
    ok = isinstance(value, list | tuple) and all(isinstance(v, int) and v > 0 for v in value)
    if not ok or (length is not None and len(value) != length):
        want = f"a list of {length} positive ints" if length else "a list of positive ints"
        raise CheckpointError(f"{_name(ckpt)}: {dotted} should be {want}, found {value!r}")
    return [int(v) for v in value]


def _validate_hparams(ckpt: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
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
            raise CheckpointError(f"{_name(ckpt)}: {key} should be a positive int, found {value!r}")
    if not isinstance(_get(ckpt, f"{hd_key}.padding"), int):
        raise CheckpointError(f"{_name(ckpt)}: {hd_key}.padding should be an int")
    if bb.get("block_type") not in ("basic", "bottleneck"):
        raise CheckpointError(f"{_name(ckpt)}: {bb_key}.block_type should be 'basic' or 'bottleneck', "
                              f"found {bb.get('block_type')!r}")
    checks = [("spatial_dims", 3, bb), ("in_channels", 1, bb), ("decoder_type", "fpn", bb)]
    for key, want, net in checks + [("add_fpn_later_conv", False, bb), ("spatial_dims", 3, hd)]:
        if key in net and net[key] is not None and net[key] != want:
            raise CheckpointError(f"{_name(ckpt)}: {key} = {net[key]!r} is not supported (only {want!r})")
    bb.setdefault("no_max_pool", True)
    return bb, hd


def _detect_app(ckpt: Mapping[str, Any]) -> None:
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
        raise CheckpointError(f"{_name(ckpt)} has no '{BACKBONE_PREFIX}' or '{HEADS_PREFIX}' tensors: "
                              "not a CryoSiam checkpoint")
    raise CheckpointError(f"{_name(ckpt)} is a CryoSiam {app} checkpoint, not an instance one")


def build_model(ckpt: Mapping[str, Any], *, device: str | torch.device = "cpu") -> InstanceNetwork:
    """Build the instance network from a checkpoint dict and load its weights.

    Parameters
    ----------
    ckpt : dict
        As returned by :func:`load_checkpoint`.
    device : str or torch.device, default "cpu"
        Where the model lives.

    Returns
    -------
    InstanceNetwork
        In eval mode, float32, on `device`.

    Raises
    ------
    CheckpointError
        The checkpoint is of another CryoSiam app, its hyper-parameters are missing or invalid, or some
        inference-path tensors are missing or of the wrong shape (all of them are listed).
    """
    _detect_app(ckpt)
    bb_net, hd_net = _validate_hparams(ckpt)
    model = InstanceNetwork(bb_net, hd_net)
    sd = ckpt["state_dict"]
    wanted = {f"{BACKBONE_PREFIX}{k}": (f"backbone.{k}", v) for k, v in model.backbone.state_dict().items()}
    wanted |= {f"{HEADS_PREFIX}{k}": (f"heads.{k}", v) for k, v in model.heads.state_dict().items()}
    missing: dict[str, list[str]] = {}  # parent module -> missing tensor names, to list them compactly
    misshapen, tensors = [], {}
    for file_key, (model_key, ref) in wanted.items():
        short = file_key.split(".", 1)[1]
        tensor = sd.get(file_key)
        if tensor is None:
            parent, leaf = short.rsplit(".", 1)
            missing.setdefault(parent, []).append(leaf)
        elif tuple(tensor.shape) != tuple(ref.shape):
            misshapen.append(f"{short} ({tuple(tensor.shape)}, expected {tuple(ref.shape)})")
        else:
            tensors[model_key] = tensor.to(ref.dtype)
    if missing or misshapen:
        n = len(misshapen) + sum(map(len, missing.values()))
        listing = [f"{p}.{ls[0]}" if len(ls) == 1 else f"{p}.{{{','.join(ls)}}}" for p, ls in missing.items()]
        listing = [f"{m} (missing)" for m in listing] + misshapen
        raise CheckpointError(f"{_name(ckpt)}: {n} tensors missing or misshapen: {', '.join(listing)}")
    model.load_state_dict(tensors, strict=True)
    ignored = len([k for k in sd if k not in wanted])
    logger.debug("%s: loaded %d tensors, ignored %d unused ones", _name(ckpt), len(tensors), ignored)
    return model.to(device=device, dtype=torch.float32).eval()


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
        raise CheckpointError(f"{_name(ckpt)}: {key} should be an int or 3 ints, positive multiples of 4; "
                              f"found {value!r}")
    return (int(sizes[0]), int(sizes[1]), int(sizes[2]))


def count_parameters(module: nn.Module) -> int:
    """Return the number of unique parameter values of `module` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
