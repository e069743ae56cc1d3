"""The instance network (DenseSimSiam backbone + InstanceHeads), rebuilt from a checkpoint's hyper-parameters.

The network is rebuilt from the checkpoint's own ``hyper_parameters`` (never from the YAML):
the backbone from ``hyper_parameters.backbone_config.parameters.network`` and the heads from
``hyper_parameters.config.parameters.network``. Only the inference path exists as modules (encoder convs,
FPN decoder, dense projector, three heads); ``global_*``, ``predictor``, ``level_*`` and ``encoder.fc``
tensors of the file are ignored.

Checkpoints are read by :mod:`cryosiam_dask.network.checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cryosiam_dask.errors import CheckpointError
from cryosiam_dask.network.checkpoint import (
    BACKBONE_PREFIX,
    HEADS_PREFIX,
    detect_app,
    load_checkpoint,
    name_of,
    patch_size_of,
    validate_hparams,
)

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
    detect_app(ckpt)
    bb_net, hd_net = validate_hparams(ckpt)
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
        raise CheckpointError(f"{name_of(ckpt)}: {n} tensors missing or misshapen: {', '.join(listing)}")
    model.load_state_dict(tensors, strict=True)
    ignored = len([k for k in sd if k not in wanted])
    logger.debug("%s: loaded %d tensors, ignored %d unused ones", name_of(ckpt), len(tensors), ignored)
    return model.to(device=device, dtype=torch.float32).eval()


def count_parameters(module: nn.Module) -> int:
    """Return the number of unique parameter values of `module` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
