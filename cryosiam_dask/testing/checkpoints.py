"""Synthetic CryoSiam instance checkpoints in the layout of a real Lightning file (real or tiny architecture).

The real instance checkpoint cannot be downloaded here, so tests, benchmarks and the demo use files written by
:func:`write_checkpoint`: the same top-level keys, the same ``_model_backbone.`` / ``_model.`` prefixes and
the same tensors (including the ones prediction ignores: ``global_*``, ``predictor``, ``level_*``), and
``hyper_parameters = {"config": ..., "backbone_config": ...}`` from which
:func:`cryosiam_dask.network.model.build_model` rebuilds the network.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cryosiam_dask.errors import ConfigError
from cryosiam_dask.network.model import InstanceHeads, _Backbone

logger = logging.getLogger(__name__)

__all__ = ["REAL_BACKBONE", "TINY_BACKBONE", "write_checkpoint"]

REAL_BACKBONE: dict[str, Any] = {
    "block_type": "basic",
    "spatial_dims": 3,
    "in_channels": 1,
    "num_layers": [1, 1, 1, 1],
    "num_filters": [64, 128, 256, 512],
    "fpn_channels": 128,
    "no_max_pool": True,
    "dim": 256,
    "pred_dim": 64,
    "dense_dim": 64,
    "dense_pred_dim": 16,
    "include_levels_loss": 1,
}
"""§2.2 of the spec: the pretrained DenseSimSiam the released instance model was trained from."""
REAL_HEADS: dict[str, Any] = {"filters": [32, 64], "kernel_size": 3, "padding": 1}

TINY_BACKBONE: dict[str, Any] = {
    **REAL_BACKBONE,
    "num_filters": [8, 16, 32, 64],
    "fpn_channels": 16,
    "dim": 16,
    "pred_dim": 8,
    "dense_dim": 8,
    "dense_pred_dim": 4,
}
"""The golden fixture's size (249,359 values in the file)."""
TINY_HEADS: dict[str, Any] = {"filters": [4, 8], "kernel_size": 3, "padding": 1}

_HEAD_KEYS = {"filters", "kernel_size", "padding"}


class AttributeDict(dict):
    """Stand-in for Lightning's AttributeDict: with ``extras=True`` the file pickles a custom dict class."""


class _FullDenseSimSiam(nn.Module):
    """Every module of CryoSiam's DenseSimSiam that owns tensors, in the order of the real state_dict."""

    def __init__(self, net: Mapping[str, Any]) -> None:
        super().__init__()
        inference = _Backbone(net)
        expansion = 4 if net["block_type"] == "bottleneck" else 1
        fpn, dim, pred = int(net["fpn_channels"]), int(net["dim"]), int(net["pred_dim"])
        dense, dense_pred = int(net["dense_dim"]), int(net["dense_pred_dim"])
        prev = int(net["num_filters"][3]) * expansion
        self.encoder = inference.encoder
        self.encoder.fc = nn.Linear(prev, dim)  # back in its slot, after layer4
        self.decoder = inference.decoder
        self.global_projector = nn.Sequential(
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(),
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(),
            self.encoder.fc,
            nn.BatchNorm1d(dim, affine=False),
        )  # index 6 is the same module as encoder.fc, as in CryoSiam
        self.global_predictor = nn.Sequential(
            nn.Linear(dim, pred, bias=False), nn.BatchNorm1d(pred), nn.ReLU(), nn.Linear(pred, dim)
        )
        self.projector = inference.projector
        self.predictor = _dense_predictor(dense, dense_pred)
        if net.get("include_levels_loss", False):
            for level in (2, 4, 8):
                setattr(self, f"level_projector_{level}", copy.deepcopy(inference.projector))
            for level in (2, 4, 8):
                setattr(self, f"level_predictor_{level}", _dense_predictor(dense, dense_pred))
        del fpn


def _dense_predictor(dense: int, dense_pred: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(dense, dense_pred, 1, bias=False),
        nn.BatchNorm3d(dense_pred),
        nn.ReLU(),
        nn.Conv3d(dense_pred, dense, 1),
    )


def _resolve_arch(arch: str | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(arch, str):
        if arch not in ("tiny", "real"):
            raise ConfigError(f"write_checkpoint: arch should be 'tiny', 'real' or a dict, found {arch!r}")
        return (
            (dict(REAL_BACKBONE), dict(REAL_HEADS))
            if arch == "real"
            else (dict(TINY_BACKBONE), dict(TINY_HEADS))
        )
    backbone, heads = dict(TINY_BACKBONE), dict(TINY_HEADS)
    for key, value in arch.items():
        if key in _HEAD_KEYS:
            heads[key] = value
        elif key in backbone or key in ("decoder_type", "add_fpn_later_conv"):
            backbone[key] = value
        else:
            raise ConfigError(f"write_checkpoint: unknown arch key {key!r}")
    return backbone, heads


def _randomise_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm plausible trained statistics (so tests exercise them)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.num_batches_tracked.fill_(9000)
            if m.affine:
                m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
                m.bias.copy_(0.05 * torch.randn(n, generator=gen))


def _identity_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return (k / k.sum()).float()


def _engineer(
    backbone: nn.Module,
    heads: InstanceHeads,
    *,
    fg_slope: float = 20.0,
    dist_slope: float = 10.0,
    level: float = 0.27,
) -> None:
    """Wire channel 0 as a pass-through of the Gaussian-smoothed input (σ = 1 voxel) down to z[0] = s.

    Then foreground = sigmoid(fg_slope·(s − level)), distance = dist_slope·(s − level) and boundary =
    sigmoid(4 − 40·|s − level|), high at the surface s = level. ``level`` = 0.27 sits just above the
    smoothed background of :func:`cryosiam_dask.testing.synthetic.make_tomogram` (0.15 + smooth noise; the
    particle
    profile is 0.15 + 0.7·(1 − (r/R)²)), so foreground > 0.5 covers most of each particle (IoU ≈ 0.77 with its
    ground truth) and distance is ≈ 0 at the surface, ≈ 4 at the centre of a radius-5+ particle (≈ 7 for a
    profile 1 − (r/R)² on a zero background). Every other weight is zero, every BatchNorm the identity
    (mean 0, var 1, weight 1, bias 0), so 3 heads × 7 nonzero values and 1 stem kernel carry the whole map.
    """
    with torch.no_grad():
        for p in list(backbone.parameters()) + list(heads.parameters()):
            p.zero_()
        _identity_norms(backbone)
        _identity_norms(heads)
        enc = backbone.encoder
        k = enc.conv1.weight.shape[2]
        enc.conv1.weight[0, 0] = _gaussian_kernel(
            k, 1.0
        )  # s >= 0 passes bn1/ReLU and layer1's residual
        backbone.decoder.layer4.weight[0, 0] = 1.0  # res2 lateral; deeper levels are all zero
        proj = backbone.projector
        proj[0].weight[0, 0] = 1.0
        proj[3].weight[0, 0] = 1.0
        proj[6].weight[0, 0] = 1.0  # BN(affine=False) with var 1: z[0] = s / sqrt(1 + eps)
        c = heads.foreground_head[0].kernel_size[0] // 2
        for head in (heads.foreground_head, heads.distance_head):
            head[0].weight[0, 0, c, c, c] = 1.0
            head[3].weight[0, 0, c, c, c] = 1.0
        heads.foreground_head[6].weight[0, 0, c, c, c] = fg_slope
        heads.foreground_head[6].bias.fill_(-fg_slope * level)
        heads.distance_head[6].weight[0, 0, c, c, c] = dist_slope
        heads.distance_head[6].bias.fill_(-dist_slope * level)
        b = heads.boundary_head
        b[0].weight[0, 0, c, c, c], b[0].bias[0] = 1.0, -level  # relu(s - level)
        b[0].weight[1, 0, c, c, c], b[0].bias[1] = -1.0, level  # relu(level - s)
        b[3].weight[0, 0, c, c, c] = b[3].weight[0, 1, c, c, c] = 1.0  # |s - level|
        b[6].weight[0, 0, c, c, c], b[6].bias[0] = -40.0, 4.0


def _hyper_parameters(
    backbone: Mapping[str, Any], heads: Mapping[str, Any], patch: list[int]
) -> dict[str, Any]:
    config = {
        "data_folder": "data",
        "labels_folder": "labels",
        "noisy_data_folder": None,
        "patches_folder": "patches",
        "temp_dir": "tmp",
        "log_dir": ".",
        "prediction_folder": "predictions",
        "pretrained_model": "/nonexistent/dense_simsiam/version_1/model/last.ckpt",
        "file_extension": ".mrc",
        "train_files": ["synthetic.mrc"],
        "test_files": None,
        "val_files": None,
        "validation_ratio": 0.1,
        "continue_training": False,
        "parameters": {
            "nodes": 1,
            "gpu_devices": 1,
            "data": {"patch_size": patch, "patch_overlap": 0.1, "min": 0, "max": 1, "mean": 0, "std": 1},
            "network": {
                "in_channels": 1,
                "spatial_dims": 3,
                "out_channels": 5,
                "dense_dim": backbone["dense_dim"],
                "filters": list(heads["filters"]),
                "kernel_size": heads["kernel_size"],
                "padding": heads["padding"],
                "threshold": 0.5,
                "distance_prediction": True,
                "unfreeze_decoder": True,
                "unfreeze_backbone": False,
            },
        },
        "hyper_parameters": {
            "cache_rate": 0,
            "val_interval": 1,
            "batch_size": 2,
            "optimizer": "adamw",
            "lr": 0.001,
            "momentum": 0.9,
            "weight_decay": 1e-05,
            "max_epochs": 200,
        },
    }
    backbone_config = {
        "data_folder": "data",
        "log_dir": ".",
        "file_extension": ".mrc",
        "parameters": {
            "nodes": 1,
            "gpu_devices": 1,
            "data": {"patch_size": patch, "min": 0, "max": 1, "mean": 0, "std": 1},
            "network": copy.deepcopy(dict(backbone)),
        },
        "hyper_parameters": {"batch_size": 2, "optimizer": "sgd", "lr": 0.05, "max_epochs": 100},
    }
    return {"config": config, "backbone_config": backbone_config}


def _extras(heads: nn.Module) -> dict[str, Any]:
    """Lightning's training state: AdamW and OneCycleLR state, with a bound method as torch 2.1 wrote it."""
    params = list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    for p in params:
        p.grad = None
    sched_state = scheduler.state_dict()
    # torch 2.1 stored the annealing function as a bound method, which pickles the scheduler via getattr
    sched_state["anneal_func"] = scheduler._anneal_func
    return {
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 9000}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {"best_model_score": None}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [sched_state],
    }


def write_checkpoint(
    path: str | Path,
    *,
    arch: str | Mapping[str, Any] = "tiny",
    patch_size: int | list[int] = 32,
    seed: int = 0,
    engineered: bool = False,
    random_part: float = 0.0,
    extras: bool = False,
) -> Path:
    """Write a CryoSiam-layout instance checkpoint.

    Parameters
    ----------
    path : str or Path
        Output ``.ckpt`` file (parent folders are created).
    arch : {"tiny", "real"} or dict, default "tiny"
        "real": the released architecture (§2.2: filters [64, 128, 256, 512], FPN 128, dense_dim 64, heads
        [32, 64]; 15,345,344 unique backbone parameters). "tiny": the golden fixture's size (filters
        [8, 16, 32, 64], FPN 16, dim 16, pred_dim 8, dense_dim 8, dense_pred_dim 4, heads [4, 8]). A dict
        overrides tiny values (backbone network keys, or the heads' filters, kernel_size, padding).
    patch_size : int or list of 3 ints, default 32
        Stored at ``hyper_parameters.config.parameters.data.patch_size``.
    seed : int, default 0
        Seed of the random weights.
    engineered : bool, default False
        Weights that segment bright smooth particles on a dark [0, 1] background (see ``_engineer``);
        otherwise seeded random weights with plausible BatchNorm statistics.
    random_part : float, default 0.0
        With `engineered`: the encoder's deeper layers (layer2-4, 1/2 to 1/8 resolution, wide receptive
        field) get the whole seeded random initialisation, and every other weight and bias this fraction of
        it (BatchNorms stay the identity), so the deep features reach the maps at about this scale. The maps
        then still find the particles but depend on every layer and on the patch's zero padding, as a
        trained network's do (engineered weights alone depend on a small neighbourhood only, so every tiling
        gives the same maps).
    extras : bool, default False
        Also write Lightning's ``loops``, ``callbacks``, ``optimizer_states``, ``lr_schedulers`` (with a bound
        method in the scheduler state, as torch 2.1 wrote it: such files need the restricted unpickler) and
        store ``hyper_parameters`` as a dict subclass.

    Returns
    -------
    Path
        `path`.
    """
    backbone_net, heads_net = _resolve_arch(arch)
    patch = [patch_size] * 3 if isinstance(patch_size, int) else [int(p) for p in patch_size]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        backbone = _FullDenseSimSiam(backbone_net)
        heads = InstanceHeads(
            int(backbone_net["dense_dim"]),
            list(heads_net["filters"]),
            int(heads_net["kernel_size"]),
            int(heads_net["padding"]),
        )
    with torch.no_grad():
        _randomise_norms(backbone, gen)
        _randomise_norms(heads, gen)
        if engineered:
            noise = [p.detach().clone() for p in (*backbone.parameters(), *heads.parameters())]
            _engineer(backbone, heads)
            if random_part:
                norms = {id(p) for m in (*backbone.modules(), *heads.modules())
                         if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
                enc = backbone.encoder
                deep = {id(p) for layer in (enc.layer2, enc.layer3, enc.layer4) for p in layer.parameters()}
                for p, r in zip((*backbone.parameters(), *heads.parameters()), noise, strict=True):
                    if id(p) not in norms:
                        p.add_(r if id(p) in deep else random_part * r)
    state_dict = {f"_model_backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
    state_dict |= {f"_model.{k}": v.clone() for k, v in heads.state_dict().items()}
    hparams: dict[str, Any] = _hyper_parameters(backbone_net, heads_net, patch)
    ckpt: dict[str, Any] = {
        "epoch": 199,
        "global_step": 9000,
        "pytorch-lightning_version": "2.1.3",
        "state_dict": state_dict,
    }
    if extras:
        ckpt |= _extras(heads)
        ckpt["hparams_name"] = "kwargs"
        hparams = AttributeDict(hparams)
    ckpt["hyper_parameters"] = hparams
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    n_values = sum(math.prod(v.shape) for v in state_dict.values())
    logger.debug("wrote %s: %d tensors, %d values", path, len(state_dict), n_values)
    return path
