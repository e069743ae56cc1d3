"""Tests of model.py (safe loading, the network, golden parity) and synthetic_model.py (checkpoint layout)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosiam_dask.errors import CheckpointError, InputFileError
from cryosiam_dask.network.checkpoint import load_checkpoint, patch_size_of
from cryosiam_dask.network.model import build_model, count_parameters
from cryosiam_dask.testing.checkpoints import write_checkpoint

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BN_NOAFFINE = ("running_mean", "running_var", "num_batches_tracked")


def _spec_backbone_layout(f=(64, 128, 256, 512), fpn=128, dim=256, pred=64, dense=64, dense_pred=16):
    """The backbone key/shape list written out from §2.3 of the spec (independently of the code)."""
    out: list[tuple[str, tuple[int, ...]]] = []

    def bn(prefix, n, names=BN):
        out.extend((f"{prefix}.{k}", () if k == "num_batches_tracked" else (n,)) for k in names)

    out.append(("encoder.conv1.weight", (f[0], 1, 7, 7, 7)))
    bn("encoder.bn1", f[0])
    cin = f[0]
    for i, c in enumerate(f, start=1):
        p = f"encoder.layer{i}.0"
        out.append((f"{p}.conv1.weight", (c, cin, 3, 3, 3)))
        bn(f"{p}.bn1", c)
        out.append((f"{p}.conv2.weight", (c, c, 3, 3, 3)))
        bn(f"{p}.bn2", c)
        if i > 1:
            out += [(f"{p}.downsample.0.weight", (c, cin, 1, 1, 1)), (f"{p}.downsample.0.bias", (c,))]
            bn(f"{p}.downsample.1", c)
        cin = c
    out += [("encoder.fc.weight", (dim, f[3])), ("encoder.fc.bias", (dim,))]
    for name, c in (("layer4", f[0]), ("layer3", f[1]), ("layer2", f[2]), ("layer1", f[3])):
        out += [(f"decoder.{name}.weight", (fpn, c, 1, 1, 1)), (f"decoder.{name}.bias", (fpn,))]
    out.append(("global_projector.0.weight", (f[3], f[3])))
    bn("global_projector.1", f[3])
    out.append(("global_projector.3.weight", (f[3], f[3])))
    bn("global_projector.4", f[3])
    out += [("global_projector.6.weight", (dim, f[3])), ("global_projector.6.bias", (dim,))]
    bn("global_projector.7", dim, BN_NOAFFINE)
    out.append(("global_predictor.0.weight", (pred, dim)))
    bn("global_predictor.1", pred)
    out += [("global_predictor.3.weight", (dim, pred)), ("global_predictor.3.bias", (dim,))]

    def projector(name):
        out.append((f"{name}.0.weight", (fpn, fpn, 1, 1, 1)))
        bn(f"{name}.1", fpn)
        out.append((f"{name}.3.weight", (fpn, fpn, 1, 1, 1)))
        bn(f"{name}.4", fpn)
        out.extend([(f"{name}.6.weight", (dense, fpn, 1, 1, 1)), (f"{name}.6.bias", (dense,))])
        bn(f"{name}.7", dense, BN_NOAFFINE)

    def predictor(name):
        out.append((f"{name}.0.weight", (dense_pred, dense, 1, 1, 1)))
        bn(f"{name}.1", dense_pred)
        out.extend([(f"{name}.3.weight", (dense, dense_pred, 1, 1, 1)), (f"{name}.3.bias", (dense,))])

    projector("projector")
    predictor("predictor")
    for level in (2, 4, 8):
        projector(f"level_projector_{level}")
    for level in (2, 4, 8):
        predictor(f"level_predictor_{level}")
    return out


def _spec_heads_layout(dense=64, filters=(32, 64)):
    out = []
    for h in ("foreground_head", "distance_head", "boundary_head"):
        out += [(f"{h}.0.weight", (filters[0], dense, 3, 3, 3)), (f"{h}.0.bias", (filters[0],))]
        out += [(f"{h}.1.{k}", () if k == "num_batches_tracked" else (filters[0],)) for k in BN]
        out += [(f"{h}.3.weight", (filters[1], filters[0], 3, 3, 3)), (f"{h}.3.bias", (filters[1],))]
        out += [(f"{h}.4.{k}", () if k == "num_batches_tracked" else (filters[1],)) for k in BN]
        out += [(f"{h}.6.weight", (1, filters[1], 3, 3, 3)), (f"{h}.6.bias", (1,))]
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=3)


def _save(tmp_path: Path, name: str, state_dict: dict, hparams: dict) -> Path:
    path = tmp_path / name
    torch.save({"epoch": 1, "state_dict": state_dict, "hyper_parameters": hparams}, path)
    return path


# ------------------------------------------------------------------------------------------ synthetic layout
@pytest.mark.slow
def test_real_arch_layout_and_parameter_count(tmp_path):
    path = write_checkpoint(tmp_path / "real.ckpt", arch="real")
    raw = torch.load(path, weights_only=True)
    assert {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters"} <= set(raw)
    sd = raw["state_dict"]
    bb, hd = "_model_backbone.", "_model."
    backbone = [(k[len(bb) :], tuple(v.shape)) for k, v in sd.items() if k.startswith(bb)]
    heads = [(k[len(hd) :], tuple(v.shape)) for k, v in sd.items() if k.startswith(hd)]
    assert len(backbone) + len(heads) == len(sd)
    assert backbone == _spec_backbone_layout()
    assert heads == _spec_heads_layout()
    # unique backbone parameters: no BN buffers, and global_projector.6 is encoder.fc itself
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = {k: v.numel() for k, v in sd.items() if not k.endswith(buffers)}
    n_backbone = sum(n for k, n in params.items() if k.startswith(bb) and ".global_projector.6." not in k)
    assert n_backbone == 15_345_344
    n_heads = sum(n for k, n in params.items() if k.startswith("_model."))
    assert n_heads == 3 * 112_609
    net = raw["hyper_parameters"]["backbone_config"]["parameters"]["network"]
    assert net["num_filters"] == [64, 128, 256, 512] and net["fpn_channels"] == 128 and net["dense_dim"] == 64
    model = build_model(load_checkpoint(path))
    unused = ("encoder.fc.", "global_", "predictor.", "level_")
    n_used = sum(n for k, n in params.items() if not k.split(".", 1)[1].startswith(unused))
    assert count_parameters(model) == n_used


def test_tiny_matches_golden_layout(tiny_ckpt, golden):
    ours = torch.load(tiny_ckpt, weights_only=True)
    theirs = torch.load(golden / "model" / "cryosiam_instance_tiny.ckpt", weights_only=True)
    assert [(k, v.shape) for k, v in ours["state_dict"].items()] == [
        (k, v.shape) for k, v in theirs["state_dict"].items()
    ]
    for part in ("backbone_config", "config"):
        assert (ours["hyper_parameters"][part]["parameters"]["network"].keys()
                == theirs["hyper_parameters"][part]["parameters"]["network"].keys())


def test_tiny_loads_and_runs(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)
    assert set(ckpt) == {"state_dict", "hyper_parameters"}
    assert patch_size_of(ckpt) == (32, 32, 32)
    model = build_model(ckpt)
    assert not model.training
    x = torch.rand(2, 1, 16, 24, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fg, dist, bnd = model(x)
    for a in (fg, dist, bnd):
        assert a.shape == (2, 1, 16, 24, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert 0 <= fg.min() and fg.max() <= 1 and 0 <= bnd.min() and bnd.max() <= 1
    with torch.no_grad():
        raw = model.heads(model.backbone(x))
    assert torch.equal(fg, torch.sigmoid(raw[0])) and torch.equal(bnd, torch.sigmoid(raw[2]))
    assert torch.equal(dist, raw[1])  # distance stays raw
    # different seeds give different networks
    other = build_model(load_checkpoint(write_checkpoint(tiny_ckpt.with_name("seed4.ckpt"), seed=4)))
    with torch.no_grad():
        assert not torch.allclose(other(x)[1], dist)


def test_odd_sizes_keep_the_input_size(tiny_ckpt):
    """Sizes that are not multiples of 8 still run: strided convs round up, the FPN upsamples to each size."""
    model = build_model(load_checkpoint(tiny_ckpt))
    with torch.no_grad():
        outs = model(torch.rand(1, 1, 13, 20, 9))
    assert all(o.shape == (1, 1, 13, 20, 9) for o in outs)


def test_patch_size_of(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)
    data = ckpt["hyper_parameters"]["config"]["parameters"]["data"]
    data["patch_size"] = 48
    assert patch_size_of(ckpt) == (48, 48, 48)
    data["patch_size"] = [32, 64, 64]
    assert patch_size_of(ckpt) == (32, 64, 64)
    for bad in (30, [32, 32], [32, 32, 34], "32", 0):
        data["patch_size"] = bad
        with pytest.raises(CheckpointError, match=r"tiny\.ckpt: .*patch_size.*multiples of 4"):
            patch_size_of(ckpt)


# ------------------------------------------------------------------------------------------ golden parity
def test_golden_checkpoint_kept_corner(golden):
    import h5py
    import mrcfile

    ckpt = load_checkpoint(golden / "model" / "cryosiam_instance_tiny.ckpt")
    model = build_model(ckpt)
    p = patch_size_of(ckpt)
    assert p == (32, 32, 32)
    vol = np.clip(mrcfile.read(golden / "data" / "TS_tiny.mrc"), 0, 1).astype(np.float32)
    with torch.no_grad():
        outs = model(torch.from_numpy(np.ascontiguousarray(vol[None, None, :32, :32, :32])))
    # the first patch keeps [0, 24) on each axis; the golden maps are zero outside the lamella z in [6, 34)
    with h5py.File(golden / "predictions" / "TS_tiny_preds.h5", "r") as f:
        names, tols = ("foreground", "distances", "boundaries"), (1e-5, 2e-5, 1e-5)
        for out, name, tol in zip(outs, names, tols, strict=True):
            want = f[name][6:24, :24, :24]
            got = out[0, 0, 6:24, :24, :24].numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)
            assert float(np.ptp(want)) > 0.5  # the comparison is not between two flat maps


# ------------------------------------------------------------------------------------------ errors
def test_missing_and_misshapen_tensors_listed(tiny_ckpt, tmp_path):
    raw = torch.load(tiny_ckpt, weights_only=True)
    sd = dict(raw["state_dict"])
    del sd["_model_backbone.encoder.conv1.weight"], sd["_model.boundary_head.4.running_var"]
    sd["_model_backbone.decoder.layer2.weight"] = torch.zeros(16, 31, 1, 1, 1)
    del sd["_model_backbone.level_projector_2.0.weight"]  # unused: must not be reported
    path = _save(tmp_path, "broken.ckpt", sd, raw["hyper_parameters"])
    with pytest.raises(CheckpointError) as info:
        build_model(load_checkpoint(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("broken.ckpt: 3 tensors missing or misshapen: ")
    assert "encoder.conv1.weight (missing)" in msg and "boundary_head.4.running_var (missing)" in msg
    assert "decoder.layer2.weight ((16, 31, 1, 1, 1), expected (16, 32, 1, 1, 1))" in msg
    assert "level_projector" not in msg


def test_bad_hyper_parameters(tiny_ckpt, tmp_path):
    raw = torch.load(tiny_ckpt, weights_only=True)
    hp = raw["hyper_parameters"]
    hp["backbone_config"]["parameters"]["network"]["num_filters"] = [8, 16, 32]
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: .*num_filters should be a list of 4"):
        build_model(load_checkpoint(_save(tmp_path, "bad.ckpt", raw["state_dict"], hp)))
    del hp["config"]["parameters"]["network"]
    with pytest.raises(CheckpointError, match=r"config\.parameters\.network is missing"):
        build_model(load_checkpoint(_save(tmp_path, "bad.ckpt", raw["state_dict"], hp)))


@pytest.mark.parametrize(
    ("rename", "app"),
    [
        ({"foreground_head": "semantic_head", "boundary_head": None}, "semantic segmentation"),
        ({"foreground_head": "head", "distance_head": None, "boundary_head": None}, "denoising/regression"),
        ({"foreground_head": None, "distance_head": None, "boundary_head": None}, "pretraining-only"),
    ],
)
def test_foreign_app_checkpoints_named(tiny_ckpt, tmp_path, rename, app):
    raw = torch.load(tiny_ckpt, weights_only=True)
    sd = {}
    for k, v in raw["state_dict"].items():
        head = k.split(".")[1] if k.startswith("_model.") else None
        if head in rename:
            if rename[head] is None:
                continue
            k = k.replace(head, rename[head])
        sd[k] = v
    path = _save(tmp_path, "other.ckpt", sd, raw["hyper_parameters"])
    expected = rf"^other\.ckpt is a CryoSiam {app}.* checkpoint, not an instance one$"
    with pytest.raises(CheckpointError, match=expected):
        build_model(load_checkpoint(path))


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(InputFileError, match=r"nothere\.ckpt does not exist"):
        load_checkpoint(tmp_path / "nothere.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"list\.ckpt holds a list"):
        load_checkpoint(tmp_path / "list.ckpt")


# ------------------------------------------------------------------------------------------ safe loading
class _Payload:
    """Unpickling this runs ``command`` (os.system) or ``code`` (builtins.exec)."""

    def __init__(self, command: str | None = None, code: str | None = None) -> None:
        self.command, self.code = command, code

    def __reduce__(self):
        if self.command is not None:
            return (os.system, (self.command,))
        return (exec, (self.code,))


@pytest.mark.parametrize("kind", ["system", "exec"])
def test_malicious_pickle_does_not_run(tiny_ckpt, tmp_path, kind):
    marker = tmp_path / f"pwned_{kind}"
    payload = _Payload(command=f"touch {marker}") if kind == "system" else _Payload(
        code=f"open({str(marker)!r}, 'w').close()")
    # the payload is live: a plain unpickler runs it
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()
    raw = torch.load(tiny_ckpt, weights_only=True)
    raw["state_dict"]["_model.extra"] = payload
    raw["hyper_parameters"]["evil"] = payload
    raw["lr_schedulers"] = [{"payload": payload}]
    path = tmp_path / "evil.ckpt"
    torch.save(raw, path)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        assert "evil.ckpt" in str(e)
    else:
        assert set(ckpt) == {"state_dict", "hyper_parameters"}
        assert "_model.extra" not in ckpt["state_dict"]
        assert "inert" in repr(ckpt["hyper_parameters"]["evil"])
        build_model(ckpt)  # the tensors are intact
    assert not marker.exists()


def test_extras_checkpoint_loads(tmp_path):
    plain = write_checkpoint(tmp_path / "plain.ckpt", seed=5)
    extra = write_checkpoint(tmp_path / "extras.ckpt", seed=5, extras=True)
    raw = torch.load(extra, weights_only=False)  # trusted here: we wrote it
    assert {"loops", "callbacks", "optimizer_states", "lr_schedulers", "hparams_name"} <= set(raw)
    assert type(raw["lr_schedulers"][0]["anneal_func"]).__name__ == "method"  # a bound method, as torch 2.1
    with pytest.raises(pickle.UnpicklingError):
        torch.load(extra, weights_only=True)  # so the restricted unpickler is what reads it
    ckpt = load_checkpoint(extra)
    assert set(ckpt) == {"state_dict", "hyper_parameters"}
    assert type(ckpt["hyper_parameters"]) is dict  # the AttributeDict stand-in became a plain dict
    a, b = build_model(ckpt), build_model(load_checkpoint(plain))
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        for u, v in zip(a(x), b(x), strict=True):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------ engineered
def test_engineered_weights_segment_bright_balls(tiny_checkpoint):
    model = build_model(load_checkpoint(tiny_checkpoint))
    radius, centres = 6.0, [(14, 14, 14), (32, 30, 16), (16, 32, 34), (34, 15, 32)]
    grid = np.indices((48, 48, 48)).astype(np.float32)
    vol = np.zeros((48, 48, 48), np.float32)
    dists = [np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))) for centre in centres]
    for r in dists:
        vol = np.maximum(vol, np.clip(1 - (r / radius) ** 2, 0, None))
    with torch.no_grad():
        fg, dist, _ = (o[0, 0].numpy() for o in model(torch.from_numpy(vol)[None, None]))
    inside = np.any([r < radius - 1.5 for r in dists], axis=0)
    outside = np.all([r > radius + 2 for r in dists], axis=0)
    assert fg[inside].min() > 0.5 and fg[outside].max() < 0.5
    for centre, r in zip(centres, dists, strict=True):
        near = r < radius
        peak = np.unravel_index(np.argmax(np.where(near, dist, -np.inf)), dist.shape)
        assert np.linalg.norm(np.subtract(peak, centre)) <= 1
        assert 3 <= dist[centre] <= 8
