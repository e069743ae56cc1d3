"""An inference-only, BatchNorm-folded, head-fused CryoSiam instance network that evaluates only kept voxels.

CryoSiam's ``exact`` tiling evaluates the whole network on every p³ patch and keeps only a central range
(``tiling.kept_ranges``: about 1/8 of an interior patch). :func:`prepare` turns an
:class:`~cryosiam_dask.network.model.InstanceNetwork` into a :class:`PreparedNetwork`:

- every BatchNorm is folded into the convolution before it (stem, residual blocks and their shortcuts,
  projector including its last ``affine=False`` BN, heads), in float64, then cast to float32;
- the projector's first 1x1 convolution (folded with its BN) is moved through the FPN's last step: it is
  linear and acts per voxel, the trilinear upsampling is linear per channel with weights summing to 1, so
  ``P(up(u) + L(r) + b) = up(P u) + (P L)(r) + P b``. ``P u`` is then computed at half resolution and the
  res2 lateral and ``P`` become one 1x1 convolution (c2 -> fpn instead of c2 -> fpn -> fpn);
- the three heads are fused: the first convs concatenated into one conv with 3x the output channels, the
  second as a grouped conv (``groups=3``), the third (3f1 -> 3) as one dense conv with a block-diagonal
  weight (or grouped, ``grouped_last=True``; see :func:`prepare`), output channels (foreground, distance,
  boundary);
- optionally, weights and activations in ``torch.channels_last_3d``.

:meth:`PreparedNetwork.forward_kept` runs the encoder on the whole patch, and the FPN's last step, the
projector and the heads only on the kept range plus their reach (the heads: ``padding`` voxels per conv
and side, the upsampling: one half-resolution voxel). The heads' zero padding is applied per conv only
where the evaluated range touches a patch face, and the upsampling's edge clamping (``align_corners=False``)
only at true patch faces, so the result equals the full-patch network cropped to the kept range.

All spatial shapes and ranges are in (z, y, x) order; tensors are ``(B, C, Z, Y, X)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F

from cryosiam_dask.network.folding import FoldedBlock, fold_conv_bn, folded_params, new_conv, pointwise
from cryosiam_dask.network.model import InstanceNetwork

__all__ = ["AMP_DTYPES", "Kept", "PreparedNetwork", "prepare"]

Kept = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""Kept output range per axis, ``((z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi))``, in patch coordinates."""

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``amp`` setting -> autocast dtype (the one table of the package)."""


def _upsample_taps(n_in: int, n_out: int, lo: int, hi: int) -> tuple[int, int, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """Linear-interpolation taps of outputs ``[lo, hi)`` of an ``n_in -> n_out`` resize (align_corners=False).

    Follows PyTorch's CPU kernel: ``src = (n_in / n_out) * (i + 0.5) - 0.5`` in float32, clamped at 0;
    ``i0 = min(floor(src), n_in - 1)``, ``i1 = i0 + (i0 < n_in - 1)``, ``w1 = clamp(src - i0, 0, 1)``.

    Returns
    -------
    a, b : int
        The input range ``[a, b)`` that the outputs read.
    i0, i1 : (hi - lo,) torch.Tensor of int64
        Tap indices relative to `a`.
    w1 : (hi - lo,) torch.Tensor of float32
        Weight of tap `i1` (tap `i0` has ``1 - w1``).
    """
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    dst = torch.arange(lo, hi, dtype=torch.float32)
    src = torch.clamp(scale * (dst + 0.5) - 0.5, min=0.0)
    i0 = torch.clamp(torch.floor(src).long(), max=n_in - 1)
    i1 = i0 + (i0 < n_in - 1).long()
    w1 = torch.clamp(src - i0.float(), 0.0, 1.0)
    a, b = int(i0.min()), int(i1.max()) + 1
    return a, b, i0 - a, i1 - a, w1


def _face_conv(x: torch.Tensor, conv: nn.Conv3d, rng: list[tuple[int, int]], size: Sequence[int],
               reach: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A 'same' convolution of a crop that zero-pads only at patch faces.

    Parameters
    ----------
    x : (B, C, nz, ny, nx) torch.Tensor
        The input on the patch range `rng` (per axis (lo, hi), z, y, x).
    conv : nn.Conv3d
        Stride 1, no padding of its own; kernel ``2 * reach + 1``.
    rng : list of 3 (lo, hi)
        Patch range of `x`.
    size : 3 ints
        Patch size (Z, Y, X).
    reach : int
        Padding of the original convolution.

    Returns
    -------
    y : (B, C_out, mz, my, mx) torch.Tensor
        The original (zero-padded, full-patch) convolution's output on the returned range.
    out_rng : list of 3 (lo, hi)
        ``lo`` (``hi``) stays at a face, else moves in by `reach`.
    """
    out_rng = []
    pads: list[int] = []  # F.pad order: x, y, z; only for axes with a face on one side
    sym = [0, 0, 0]  # the conv's own (symmetric) padding, for axes with faces on both sides
    for ax in (2, 1, 0):
        lo, hi = rng[ax]
        left, right = lo == 0, hi == size[ax]
        sym[ax] = reach if left and right else 0
        pads += [reach if left and not right else 0, reach if right and not left else 0]
    for (lo, hi), n in zip(rng, size, strict=True):
        out_rng.append((lo if lo == 0 else lo + reach, hi if hi == n else hi - reach))
    if any(pads):
        x = F.pad(x, pads)
        if conv.weight.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.contiguous(memory_format=torch.channels_last_3d)
    y = F.conv3d(x, conv.weight, conv.bias, padding=tuple(sym), groups=conv.groups)
    return y, out_rng


# ----------------------------------------------------------------------------------------------- network
class PreparedNetwork(nn.Module):
    """Inference-only CryoSiam instance network: BNs folded, heads fused, kept-range evaluation.

    Built by :func:`prepare`; float32 weights, eval mode. Inputs (B, 1, Z, Y, X), (z, y, x) axis order.
    """

    def __init__(
        self, model: InstanceNetwork, *, channels_last: bool = False, grouped_last: bool = False
    ) -> None:
        super().__init__()
        bb, hd = model.backbone, model.heads
        enc = bb.encoder
        # encoder
        self.stem = fold_conv_bn(enc.conv1, enc.bn1)
        if not isinstance(enc.act, nn.ReLU):
            raise TypeError(f"only a ReLU stem is supported, found {type(enc.act).__name__}")
        self.maxpool = None if enc.no_max_pool else copy.deepcopy(enc.maxpool)
        self.layers = nn.ModuleList(
            nn.Sequential(*[FoldedBlock(b) for b in getattr(enc, f"layer{i}")]) for i in (1, 2, 3, 4)
        )
        # FPN: the three low-resolution steps as in the original
        dec = bb.decoder
        self.lat5 = pointwise(copy.deepcopy(dec.layer1))
        self.lat4 = pointwise(copy.deepcopy(dec.layer2))
        self.lat3 = pointwise(copy.deepcopy(dec.layer3))
        # projector[0] + BN1 moved through the last FPN step: up(P u) + (P L2) r2 + (P b2 + t1)
        proj = bb.projector
        p_w, p_b = folded_params(proj[0], proj[1])  # (fpn, fpn, 1, 1, 1), shift t1
        p_mat = p_w.flatten(1)  # (fpn, fpn)
        self.pre_up = pointwise(new_conv(p_w, None, proj[0]))  # on the res3-level map, before upsampling
        l2_w = dec.layer4.weight.detach().double().flatten(1)  # (fpn, c2)
        l2_b = dec.layer4.bias.detach().double()
        lat_w = (p_mat @ l2_w).view(p_mat.shape[0], l2_w.shape[1], 1, 1, 1)
        self.lat2 = pointwise(new_conv(lat_w, p_mat @ l2_b + p_b, dec.layer4))
        self.proj1 = pointwise(fold_conv_bn(proj[3], proj[4]))
        self.proj2 = pointwise(fold_conv_bn(proj[6], proj[7]))  # affine=False BN folded too
        # heads: first convs concatenated, the second grouped (groups=3), the last dense block-diagonal
        heads = (hd.foreground_head, hd.distance_head, hd.boundary_head)
        k = heads[0][0].kernel_size
        pad = heads[0][0].padding
        if len(set(k)) != 1 or k[0] % 2 != 1 or pad != (k[0] // 2,) * 3:
            raise ValueError(f"heads need an odd cubic kernel with 'same' padding, found {k}, padding {pad}")
        self.reach = int(pad[0])
        fused = []
        for j, groups in ((0, 1), (3, 3), (6, 3)):
            params = [folded_params(h[j], h[j + 1] if j < 6 else None) for h in heads]
            w = torch.cat([p[0] for p in params])
            b = torch.cat([p[1] for p in params])
            if j == 6 and not grouped_last:  # block-diagonal dense weight: the same sums, plus exact zeros
                dense = torch.zeros(3, w.shape[1] * 3, *w.shape[2:], dtype=w.dtype)
                for i in range(3):
                    dense[i, i * w.shape[1]:(i + 1) * w.shape[1]] = w[i]
                w, groups = dense, 1
            fused.append(new_conv(w, b, heads[0][j], groups=groups, padding=0))
        self.head1, self.head2, self.head3 = fused
        self.channels_last = bool(channels_last)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        if self.channels_last:
            self.to(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------ pieces
    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder on whole patches.

        Parameters
        ----------
        x : (B, 1, Z, Y, X) torch.Tensor of float32

        Returns
        -------
        res2, res3, res4, res5 : torch.Tensor
            (B, c_i, Z_i, Y_i, X_i) outputs of layer1..layer4 (res2 at full resolution without max-pool,
            then ceil(n/2) per stride-2 level), as the original encoder's.
        """
        x = self.stem(self._fmt(x)).relu_()
        if self.maxpool is not None:
            x = self.maxpool(x)
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs[0], outs[1], outs[2], outs[3]

    def run_heads(self, z: torch.Tensor, rng: Sequence[tuple[int, int]], size: Sequence[int]) -> tuple[
            torch.Tensor, list[tuple[int, int]]]:
        """The three fused heads on a crop of the dense embedding, zero-padded only at patch faces.

        Parameters
        ----------
        z : (B, dense_dim, nz, ny, nx) torch.Tensor
            Dense embedding on the patch range `rng`.
        rng : 3 (lo, hi)
            Patch range of `z`, (z, y, x).
        size : 3 ints
            Patch size (Z, Y, X).

        Returns
        -------
        logits : (B, 3, mz, my, mx) torch.Tensor
            Raw foreground, distance, boundary (no sigmoid), equal to the original heads on the full patch
            restricted to `out_rng`.
        out_rng : list of 3 (lo, hi)
            Each side moves in by ``3 * reach`` unless it is at a patch face.
        """
        r = list(rng)
        z, r = _face_conv(self._fmt(z), self.head1, r, size, self.reach)
        z, r = _face_conv(z.relu_(), self.head2, r, size, self.reach)
        z, r = _face_conv(z.relu_(), self.head3, r, size, self.reach)
        return z, r

    def _extended(self, kept: Kept, size: Sequence[int]) -> list[tuple[int, int]]:
        reach = 3 * self.reach
        out = []
        for (lo, hi), n in zip(kept, size, strict=True):
            if not 0 <= lo < hi <= n:
                raise ValueError(f"kept range {(lo, hi)} is not inside [0, {n})")
            out.append((max(0, lo - reach), min(n, hi + reach)))
        return out

    # ------------------------------------------------------------------ forward
    def forward_kept(self, x: torch.Tensor, kept: Kept, *, amp: str | None = None) -> torch.Tensor:
        """Run the network on a batch of patches and return only the kept range.

        Parameters
        ----------
        x : (B, 1, Z, Y, X) torch.Tensor of float32
            Normalised patches, axes (batch, channel, z, y, x).
        kept : ((z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi))
            Output range kept for the whole batch, in patch coordinates (``0 <= lo < hi <= size``).
        amp : {None, "bf16", "fp16"}, default None
            Autocast dtype (None: float32 throughout).

        Returns
        -------
        (B, 3, kz, ky, kx) torch.Tensor of float32, contiguous
            sigmoid(foreground), distance, sigmoid(boundary) on the kept range, equal to
            ``InstanceNetwork(x)`` cropped to `kept` (``k = hi - lo`` per axis).
        """
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"x should be (B, 1, Z, Y, X), found {tuple(x.shape)}")
        ctx = nullcontext() if amp is None else torch.autocast(x.device.type, dtype=AMP_DTYPES[amp])
        size = tuple(int(n) for n in x.shape[2:])
        with ctx:
            res2, res3, res4, res5 = self.encode(x)
            if tuple(res2.shape[2:]) != size:
                raise ValueError("forward_kept needs res2 at the input's resolution (no_max_pool=True)")
            u = self.lat5(res5)
            for lat, feat in ((self.lat4, res4), (self.lat3, res3)):
                lateral = lat(feat)
                u = F.interpolate(u, size=lateral.shape[2:], mode="trilinear", align_corners=False) + lateral
            ext = self._extended(kept, size)
            # crop the res3-level map to what the upsampling of `ext` reads, then apply P there (cheaper)
            full_u = tuple(int(n) for n in u.shape[2:])
            src = [_upsample_taps(n, m, lo, hi)[:2] for n, m, (lo, hi) in zip(full_u, size, ext, strict=True)]
            u = self.pre_up(u[:, :, src[0][0]:src[0][1], src[1][0]:src[1][1], src[2][0]:src[2][1]])
            up = _resize_crop(u, full_u, size, ext, src)
            r2 = res2[:, :, ext[0][0]:ext[0][1], ext[1][0]:ext[1][1], ext[2][0]:ext[2][1]]
            h = self.lat2(r2)
            h += up
            h = self.proj1(h.relu_()).relu_()
            zmap = self.proj2(h)
            logits, r = self.run_heads(zmap, ext, size)
            crop = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(kept, r, strict=True))
            logits = logits[(slice(None), slice(None), *crop)].float()
        fg, dist, bnd = logits[:, 0:1], logits[:, 1:2], logits[:, 2:3]
        return torch.cat([torch.sigmoid(fg), dist, torch.sigmoid(bnd)], dim=1).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole-patch forward, a drop-in for ``InstanceNetwork.forward``.

        Parameters
        ----------
        x : (B, 1, Z, Y, X) torch.Tensor of float32

        Returns
        -------
        foreground, distance, boundary : (B, 1, Z, Y, X) torch.Tensor of float32
        """
        kept = tuple((0, int(n)) for n in x.shape[2:])
        out = self.forward_kept(x, kept)  # type: ignore[arg-type]
        return out[:, 0:1], out[:, 1:2], out[:, 2:3]


def _resize_crop(u: torch.Tensor, full_in: Sequence[int], out_size: Sequence[int],
                        ranges: Sequence[tuple[int, int]], src: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Trilinear resize (align_corners=False) of a crop `u` of a map of size `full_in`, only on `ranges`.

    Parameters
    ----------
    u : (B, C, bz - az, by - ay, bx - ax) torch.Tensor
        The crop ``[a, b)`` per axis (`src`) of a (B, C, *full_in) map.
    full_in, out_size : 3 ints
        (z, y, x) sizes of the whole low-resolution map and of the resized map.
    ranges : 3 (lo, hi)
        Output ranges, (z, y, x).
    src : 3 (a, b)
        As returned by :func:`_upsample_taps` for `ranges`.

    Returns
    -------
    (B, C, hz - lz, hy - ly, hx - lx) torch.Tensor

    Notes
    -----
    Where every axis is resized exactly 2x, this runs ``F.interpolate`` on the crop and slices: the crop's
    own edge clamping only changes its first and last outputs, which lie outside `ranges` unless the crop
    is at a true face (where the clamping is the full map's). Otherwise, separable gathers.
    """
    if all(int(m) == 2 * int(n) for n, m in zip(full_in, out_size, strict=True)):
        size = tuple(2 * int(n) for n in u.shape[2:])
        up = F.interpolate(u, size=size, mode="trilinear", align_corners=False)
        return up[(slice(None), slice(None), *[slice(lo - 2 * a, hi - 2 * a) for (lo, hi), (a, _) in
                                                zip(ranges, src, strict=True)])]
    for dim in (4, 3, 2):  # x, then y, then z, as PyTorch's kernel nests them
        ax = dim - 2
        a, _, i0, i1, w1 = _upsample_taps(int(full_in[ax]), int(out_size[ax]), *ranges[ax])
        i0, i1 = i0 + (a - src[ax][0]), i1 + (a - src[ax][0])
        shape = [1, 1, 1, 1, 1]
        shape[dim] = -1
        w1 = w1.to(device=u.device, dtype=u.dtype).view(shape)
        u = u.index_select(dim, i0.to(u.device)) * (1 - w1) + u.index_select(dim, i1.to(u.device)) * w1
    return u


def prepare(
    model: InstanceNetwork, *, channels_last: bool = False, grouped_last: bool = False
) -> PreparedNetwork:
    """Build the inference-only :class:`PreparedNetwork` of an instance network.

    Parameters
    ----------
    model : InstanceNetwork
        From :func:`~cryosiam_dask.network.model.build_model` (eval mode; running BN statistics folded).
        Not modified.
    channels_last : bool, default False
        Store weights in ``torch.channels_last_3d`` and run activations in it (same results to ~1e-7, faster
        with oneDNN on CPU).
    grouped_last : bool, default False
        Fuse the heads' last convs (3f1 -> 3) as a grouped conv (``groups=3``). By default they are one dense
        conv with a block-diagonal weight (3x its MACs, but those are ~1.5 % of the heads' and oneDNN runs a
        groups=3 conv with one output channel per group 4x slower contiguous, 1.1x slower channels-last).

    Returns
    -------
    PreparedNetwork
        Float32, eval mode, on the model's device, no gradients.
    """
    if model.training:
        raise ValueError("prepare() needs a model in eval mode (BatchNorm running statistics)")
    device = next(model.parameters()).device
    with torch.no_grad():
        net = PreparedNetwork(model, channels_last=channels_last, grouped_last=grouped_last)
    return net.to(device)
