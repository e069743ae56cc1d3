"""The prepared network: BN folding, head fusion, the kept-range forward against the full-patch network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.flops import flops_per_output_voxel
from cryosiam_dask.network.checkpoint import load_checkpoint
from cryosiam_dask.network.folding import Pointwise, fold_conv_bn, pointwise
from cryosiam_dask.network.model import InstanceNetwork, build_model
from cryosiam_dask.network.prepared import PreparedNetwork, _resize_crop, _upsample_taps, prepare
from cryosiam_dask.network.tiling import kept_ranges
from cryosiam_dask.testing.checkpoints import write_checkpoint

GOLDEN_SHAPE = (40, 61, 44)
ATOL = 1e-5



def _kinds(size: int, patch: int) -> list[tuple[int, int]]:
    """Distinct kept ranges in patch coordinates of one axis of the original's patch grid."""
    return sorted({(lo - c0, hi - c0) for c0, lo, hi in kept_ranges(size, patch)})


def _crop(t: torch.Tensor, kept) -> torch.Tensor:
    return t[(slice(None), slice(None), *[slice(a, b) for a, b in kept])]


def _assert_maps_close(out: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    """Channels (foreground, distance, boundary): probabilities absolute, distance relative to its scale."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = [1.0, max(1.0, float(ref[:, 1].abs().max())), 1.0]
    for c in range(3):
        err = float((out[:, c] - ref[:, c]).abs().max())
        assert err <= atol * scale[c], (c, err, atol * scale[c])


@pytest.fixture(scope="module")
def golden_net(golden) -> InstanceNetwork:
    return build_model(load_checkpoint(golden / "model" / "cryosiam_instance_tiny.ckpt"))


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory) -> InstanceNetwork:
    path = tmp_path_factory.mktemp("ckpt") / "random_tiny.ckpt"
    write_checkpoint(path, arch="tiny", patch_size=32, seed=7)
    return build_model(load_checkpoint(path))


@pytest.fixture(scope="module")
def golden_patches(golden) -> torch.Tensor:
    """Two 32³ patches of the golden tomogram (values in [0, 1]; its normalisation is the identity)."""
    mrcfile = pytest.importorskip("mrcfile")
    vol = mrcfile.read(golden / "data" / "TS_tiny.mrc").astype(np.float32)
    assert vol.shape == GOLDEN_SHAPE
    return torch.from_numpy(np.stack([vol[:32, 16:48, :32], vol[8:40, 29:61, 12:44]]))[:, None].contiguous()


@pytest.fixture(scope="module")
def random_patches() -> torch.Tensor:
    return torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(model(x), 1)


# ----------------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_fold_conv_bn(affine: bool, bias: bool, stride: int) -> None:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(5, 6, 3, stride=stride, padding=1, bias=bias)
    bn = nn.BatchNorm3d(6, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=gen))
        bn.running_var.copy_(0.3 + torch.rand(6, generator=gen))
        if affine:
            bn.weight.copy_(torch.randn(6, generator=gen))
            bn.bias.copy_(torch.randn(6, generator=gen))
    x = torch.randn(2, 5, 9, 10, 11, generator=gen)
    folded = fold_conv_bn(conv, bn)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
    assert folded.stride == conv.stride and folded.padding == conv.padding and folded.bias is not None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_equals_the_1x1_convolution(stride: int, bias: bool, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv3d(7, 5, 1, stride=stride, bias=bias)
    x = torch.randn(2, 7, 9, 10, 11, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    pw = pointwise(conv)
    assert isinstance(pw, Pointwise)
    with torch.inference_mode():
        got, want = pw(x), conv(x)
    assert got.shape == want.shape  # ceil(n / stride) per axis, as the convolution
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for other in (nn.Conv3d(7, 5, 3, padding=1), nn.Conv3d(6, 6, 1, groups=2), nn.Conv3d(7, 5, 1, padding=1)):
        assert pointwise(other) is other  # not pointwise: left as it is
        with pytest.raises(ValueError, match="not a pointwise"):
            Pointwise(other)


def test_encoder_folding(random_tiny: InstanceNetwork, random_patches: torch.Tensor) -> None:
    enc = random_tiny.backbone.encoder
    pn = prepare(random_tiny)
    with torch.inference_mode():
        h = enc.act(enc.bn1(enc.conv1(random_patches)))
        want = []
        for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
            h = layer(h)
            want.append(h)
        got = pn.encode(random_patches)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped_last", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_head_fusion(random_tiny: InstanceNetwork, channels_last: bool, grouped_last: bool) -> None:
    z = torch.randn(2, 8, 20, 17, 12, generator=torch.Generator().manual_seed(2))
    pn = prepare(random_tiny, channels_last=channels_last, grouped_last=grouped_last)
    assert pn.head1.groups == 1 and pn.head1.out_channels == 3 * 4
    assert pn.head2.groups == 3 and pn.head2.out_channels == 3 * 8
    assert pn.head3.groups == (3 if grouped_last else 1) and pn.head3.out_channels == 3
    with torch.inference_mode():
        want = torch.cat(random_tiny.heads(z), 1)
        full = [(0, n) for n in z.shape[2:]]
        got, rng = pn.run_heads(z, full, z.shape[2:])
        assert rng == full
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # an interior crop: no padding where the crop does not touch a face, the range moves in by 3
        sub = [(0, 9), (4, 17), (2, 10)]
        got, rng = pn.run_heads(_crop(z, sub), sub, z.shape[2:])
        assert rng == [(0, 6), (7, 17), (5, 7)]
        torch.testing.assert_close(got, _crop(want, rng), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 32), (9, 18), (5, 9), (3, 7)])
def test_resize_crop_matches_interpolate(n_in: int, n_out: int) -> None:
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(1, 2, n_in, n_in + 1, n_in, generator=gen)
    full_out = (n_out, n_out + 2, n_out)
    want = F.interpolate(u, size=full_out, mode="trilinear", align_corners=False)
    for ranges in ([(0, n_out), (0, n_out + 2), (0, n_out)], [(1, 4), (2, n_out + 2), (0, 1)],
                   [(n_out - 1, n_out), (3, 5), (2, n_out - 1)]):
        src = [_upsample_taps(n, m, lo, hi)[:2] for n, m, (lo, hi) in zip(u.shape[2:], full_out, ranges,
                                                                         strict=True)]
        crop = u[:, :, src[0][0]:src[0][1], src[1][0]:src[1][1], src[2][0]:src[2][1]]
        got = _resize_crop(crop, u.shape[2:], full_out, ranges, src)
        torch.testing.assert_close(got, _crop(want, ranges), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("which", ["golden", "random"])
def test_prepared_full_forward(which: str, channels_last: bool, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("golden_net" if which == "golden" else "random_tiny")
    x = request.getfixturevalue("golden_patches" if which == "golden" else "random_patches")
    pn = prepare(model, channels_last=channels_last)
    assert isinstance(pn, PreparedNetwork) and not pn.training
    with torch.inference_mode():
        got = torch.cat(pn(x), 1)
    _assert_maps_close(got, _reference(model, x))


GOLDEN_KEPT = list(itertools.product(*[_kinds(n, 32) for n in GOLDEN_SHAPE]))


def test_golden_grid_kinds() -> None:
    """The golden patch grid has first, middle, last and odd kept ranges ([8, 13), [8, 29))."""
    kinds = {k for kept in GOLDEN_KEPT for k in kept}
    assert {(0, 24), (8, 24), (8, 13), (8, 29), (8, 12), (8, 28)} <= kinds


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_kept_golden_grid(golden_net: InstanceNetwork, golden_patches: torch.Tensor,
                                  channels_last: bool) -> None:
    pn = prepare(golden_net, channels_last=channels_last)
    ref = _reference(golden_net, golden_patches)
    with torch.inference_mode():
        full = torch.cat(pn(golden_patches), 1)
        for kept in GOLDEN_KEPT:
            got = pn.forward_kept(golden_patches, kept)
            assert got.shape == (2, 3, *[b - a for a, b in kept]) and got.is_contiguous()
            _assert_maps_close(got, _crop(ref, kept))
            # the crop logic itself is exact: equal to the prepared whole-patch forward to rounding
            torch.testing.assert_close(got, _crop(full, kept), atol=1e-6, rtol=0)


KEPT_CASES = [
    ((0, 24),) * 3,  # first patch
    ((8, 24),) * 3,  # middle
    ((8, 32),) * 3,  # last, reaching the patch end
    ((8, 13), (8, 29), (0, 24)),  # odd far-end ranges of the golden_net grid
    ((8, 29), (8, 32), (8, 13)),
    ((3, 4), (0, 32), (30, 32)),  # extended range touching faces on one or both sides
    ((0, 32),) * 3,
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kept", KEPT_CASES)
def test_forward_kept_random(random_tiny: InstanceNetwork, random_patches: torch.Tensor, kept,
                             channels_last: bool) -> None:
    pn = prepare(random_tiny, channels_last=channels_last)
    with torch.inference_mode():
        got = pn.forward_kept(random_patches, kept)
    _assert_maps_close(got, _crop(_reference(random_tiny, random_patches), kept))


def test_forward_kept_patch_not_multiple_of_8(random_tiny: InstanceNetwork) -> None:
    """p = 36: res levels 36, 18, 9, 5, so the FPN's upsampling ratios are not exactly 2."""
    x = torch.randn(1, 1, 36, 36, 36, generator=torch.Generator().manual_seed(4))
    ref = _reference(random_tiny, x)
    pn = prepare(random_tiny, channels_last=True)
    with torch.inference_mode():
        for kept in (((0, 27),) * 3, ((9, 27),) * 3, ((9, 36), (9, 20), (0, 27))):
            _assert_maps_close(pn.forward_kept(x, kept), _crop(ref, kept))


def test_forward_kept_rejects_bad_ranges(random_tiny: InstanceNetwork, random_patches: torch.Tensor) -> None:
    pn = prepare(random_tiny)
    with pytest.raises(ValueError, match="kept range"):
        pn.forward_kept(random_patches, ((0, 33), (0, 8), (0, 8)))


def test_amp_bf16(random_tiny: InstanceNetwork, random_patches: torch.Tensor) -> None:
    pn = prepare(random_tiny, channels_last=True)
    kept = ((8, 24),) * 3
    with torch.inference_mode():
        fp32 = pn.forward_kept(random_patches, kept)
        bf16 = pn.forward_kept(random_patches, kept, amp="bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert float((bf16 - fp32).abs().max()) < 0.05


def test_flops(random_tiny: InstanceNetwork) -> None:
    f = flops_per_output_voxel(random_tiny, patch=32)
    assert f["kept_voxels"] == 16**3 and f["patch_voxels"] == 32**3
    assert f["full_per_kept_voxel"] == 8 * f["full_per_patch_voxel"]
    assert f["kept_per_kept_voxel"] < f["full_per_kept_voxel"] and f["ratio"] > 1.3
    # with the grouped last head conv, folding + moving the projector's first conv only removes FLOPs
    g = flops_per_output_voxel(random_tiny, prepare(random_tiny, grouped_last=True), patch=32)
    assert g["prepared_full_per_patch_voxel"] < g["full_per_patch_voxel"]
    assert g["kept_per_kept_voxel"] < f["kept_per_kept_voxel"]
