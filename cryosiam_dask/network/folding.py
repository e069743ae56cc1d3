"""BatchNorm folded into the convolution before it (inference only), and MONAI's residual blocks folded so."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FoldedBlock", "Pointwise", "fold_conv_bn", "folded_params", "new_conv", "pointwise"]


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` in float64 of an eval-mode BatchNorm (identity when `bn` is None)."""
    if bn is None:
        return torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = bn.bias.double() - mean * scale
    else:
        shift = -mean * scale
    return scale, shift


def new_conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv3d, *, groups: int = 1,
              padding: int | tuple[int, int, int] | None = None) -> nn.Conv3d:
    """A float32 ``nn.Conv3d`` holding `weight` (out, in/groups, kz, ky, kx) and `bias`, strides of `like`."""
    out_ch, in_per_group = int(weight.shape[0]), int(weight.shape[1])
    conv = nn.Conv3d(
        in_per_group * groups, out_ch, tuple(weight.shape[2:]), stride=like.stride,
        padding=like.padding if padding is None else padding, dilation=like.dilation, groups=groups,
        bias=bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(weight.float())
        if bias is not None:
            conv.bias.copy_(bias.float())
    return conv


def folded_params(
    conv: nn.Conv3d, bn: nn.modules.batchnorm._BatchNorm | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(weight, bias)`` of ``bn(conv(x))`` as one convolution."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero padding is supported, found {conv.padding_mode!r}")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    scale, shift = _bn_scale_shift(bn, int(w.shape[0]))
    return w * scale.view(-1, 1, 1, 1, 1), b * scale + shift


def fold_conv_bn(conv: nn.Conv3d, bn: nn.modules.batchnorm._BatchNorm | None) -> nn.Conv3d:
    """Fold an eval-mode BatchNorm (affine or not) into the convolution before it.

    Parameters
    ----------
    conv : nn.Conv3d
        Input (B, C_in, Z, Y, X) -> output (B, C_out, Z', Y', X'), with or without bias.
    bn : nn.BatchNorm3d or None
        BatchNorm over C_out (running statistics used; ``affine=False`` allowed); None: no BN.

    Returns
    -------
    nn.Conv3d
        A new float32 convolution with bias, same stride / padding / dilation / groups, equal to
        ``bn(conv(x))`` (computed in float64 before the cast).
    """
    w, b = folded_params(conv, bn)
    return new_conv(w, b, conv, groups=conv.groups)


class Pointwise(nn.Module):
    """A 1x1x1 convolution (any stride, no padding) as a matrix product over the channels.

    PyTorch sends 1x1x1 ``conv3d`` on CPU to its slow reference kernel (``slow_conv3d_forward``, with a bias
    broadcast copy), not to oneDNN: on the real architecture's full-resolution 1x1 convs that was 0.94 s of a
    7.5 s fast window. Here the channels-last view ``(B, Z, Y, X, C)`` goes through one GEMM; the result is a
    ``(B, C_out, Z', Y', X')`` tensor in ``channels_last_3d`` memory (a permuted view, no copy), equal to the
    convolution up to float32 rounding.
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if not _is_pointwise(conv):
            raise ValueError(f"not a pointwise convolution: kernel {conv.kernel_size}, padding "
                             f"{conv.padding}, groups {conv.groups}")
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        bias = conv.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride = tuple(int(s) for s in conv.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, Z, Y, X) -> (B, C_out, ceil(Z/sz), ceil(Y/sy), ceil(X/sx)), channels_last_3d memory."""
        if self.stride != (1, 1, 1):
            x = x[:, :, ::self.stride[0], ::self.stride[1], ::self.stride[2]]
        return F.linear(x.permute(0, 2, 3, 4, 1), self.weight, self.bias).permute(0, 4, 1, 2, 3)


def _is_pointwise(conv: nn.Conv3d) -> bool:
    return tuple(conv.kernel_size) == (1, 1, 1) and not any(conv.padding) and conv.groups == 1


def pointwise(conv: nn.Conv3d) -> nn.Module:
    """`conv` as a :class:`Pointwise` when it is 1x1x1 without padding, else `conv` itself."""
    return Pointwise(conv) if _is_pointwise(conv) else conv


class FoldedBlock(nn.Module):
    """A MONAI ResNet block (basic or bottleneck) with its BNs folded: convs with ReLU between, + shortcut."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        convs = []
        for i in (1, 2, 3):
            conv = getattr(block, f"conv{i}", None)
            if conv is not None:
                convs.append(fold_conv_bn(conv, getattr(block, f"bn{i}")))
        self.convs = nn.ModuleList(convs)
        down = block.downsample
        if down is None:
            self.shortcut: nn.Module | None = None
        elif isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv3d):
            self.shortcut = pointwise(fold_conv_bn(down[0], down[1]))
        else:
            raise ValueError("only MONAI's shortcut type 'B' (1x1 conv + BN) is supported")
        if not isinstance(block.act, nn.ReLU):
            raise TypeError(f"only ReLU blocks are supported, found {type(block.act).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, Z, Y, X) -> (B, C_out, Z', Y', X'), as the block in eval mode."""
        out = x
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < last:
                out = out.relu_()  # in place: `out` is this block's own tensor
        out += x if self.shortcut is None else self.shortcut(x)
        return out.relu_()


# ----------------------------------------------------------------------------------------------- geometry
