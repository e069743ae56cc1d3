"""``cryosiam_dask demo``: a synthetic tomogram, lamella mask, engineered tiny checkpoint and config in a
folder, the whole pipeline run on them, and the instances found compared with the ground truth."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

logger = logging.getLogger(__name__)

DEMO_STEM = "TS_demo"


@dataclass
class DemoResult:
    """What the demo found.

    Attributes
    ----------
    n_true, n_found, n_matched : int
        Ground-truth particles (inside the lamella), instances found, and one-to-one matches with IoU >= 0.5.
    folder : Path
        Where the inputs, config and outputs are.
    """

    n_true: int
    n_found: int
    n_matched: int
    folder: Path


def match_instances(truth: np.ndarray, found: np.ndarray, *, iou: float = 0.5) -> int:
    """Count one-to-one matches of two (Z, Y, X) label volumes with IoU >= ``iou`` ."""
    t = truth.ravel().astype(np.int64)
    f = found.ravel().astype(np.int64)
    both = (t > 0) & (f > 0)
    pairs, inter = np.unique(np.stack([t[both], f[both]]), axis=1, return_counts=True)
    t_area = np.bincount(t)
    f_area = np.bincount(f)
    union = t_area[pairs[0]] + f_area[pairs[1]] - inter
    return int(np.sum(inter / union >= iou))


def demo_config(
    folder: Path,
    checkpoint: Path,
    *,
    save_raw_predictions: bool = True,
    chunk_size: tuple[int, int, int] = (32, 64, 64),
) -> dict[str, Any]:
    """A CryoSiam instance config (plus a ``cryosiam_dask`` section) for the demo layout under ``folder``."""
    return {
        "data_folder": str(folder / "data"),
        "mask_folder": str(folder / "lamella"),
        "log_dir": str(folder),
        "prediction_folder": str(folder / "predictions"),
        "trained_model": str(checkpoint),
        "file_extension": ".mrc",
        "test_files": None,
        "save_raw_predictions": save_raw_predictions,
        "parameters": {
            "gpu_devices": 1,
            "data": {"patch_size": [32, 32, 32], "min": 0, "max": 1, "mean": 0, "std": 1},
            "network": {
                "in_channels": 1,
                "spatial_dims": 3,
                "threshold_foreground": 0.5,
                "boundary_bias": 0.8,
                "min_center_distance": 1,
                "max_center_distance": 4,
                "distance_type": 1,
                "postprocessing": False,
            },
        },
        "hyper_parameters": {"batch_size": 2},
        "cryosiam_dask": {"chunk_size": list(chunk_size)},
    }


def write_demo_inputs(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (64, 128, 128),
    seed: int = 0,
    stem: str = DEMO_STEM,
    arch: str | dict = "tiny",
    patch_size: int = 32,
    save_raw_predictions: bool = True,
) -> Path:
    """Write a synthetic tomogram, lamella mask, checkpoint and config under ``folder``; return the config.

    Layout: ``data/<stem>.mrc``, ``lamella/<stem>_preds.h5``, ``model/<arch>.ckpt`` (engineered weights for
    the tiny architecture, random ones otherwise), ``ground_truth_labels.npy`` (inside the lamella) and
    ``config_instance.yaml``.
    """
    from cryosiam_dask.testing.checkpoints import write_checkpoint
    from cryosiam_dask.testing.synthetic import make_tomogram, write_mask_h5, write_mrc

    folder = Path(folder)
    for sub in ("data", "lamella", "model", "predictions"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    z = shape[0]
    synth = make_tomogram(
        shape,
        n_particles=max(4, int(np.prod(shape) / 25000)),
        radii=(5, 8),
        seed=seed,
        lamella=(z // 8, z - z // 8),
    )
    write_mrc(folder / "data" / f"{stem}.mrc", synth.tomogram, voxel_size=10.0)
    write_mask_h5(folder / "lamella" / f"{stem}_preds.h5", synth.mask)
    np.save(folder / "ground_truth_labels.npy", synth.labels * (synth.mask > 0))
    name = arch if isinstance(arch, str) else "custom"
    checkpoint = folder / "model" / f"cryosiam_instance_{name}.ckpt"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, arch=arch, patch_size=patch_size, engineered=arch != "real")
    config = demo_config(folder, checkpoint, save_raw_predictions=save_raw_predictions)
    path = folder / "config_instance.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(
    folder: str | Path = "cryosiam_dask_demo",
    *,
    shape: tuple[int, int, int] = (64, 128, 128),
    device: str = "cpu",
    n_workers: int | None = None,
    seed: int = 0,
) -> DemoResult:
    """Make the demo inputs in ``folder``, run ``instance_predict`` on them and compare with the ground truth.

    Parameters
    ----------
    folder : path, default "cryosiam_dask_demo"
    shape : (Z, Y, X) tuple of int, default (64, 128, 128)
    device : {"auto", "cpu", "cuda"}, default "cpu"
    n_workers : int or None, default None
        Worker processes (None = sized to the machine).
    seed : int, default 0
    """
    import h5py

    from cryosiam_dask.config import load_config
    from cryosiam_dask.run.driver import instance_predict

    folder = Path(folder).resolve()
    config_path = write_demo_inputs(folder, shape=shape, seed=seed)
    overrides = {"device": device}
    if n_workers:
        overrides["n_workers"] = n_workers
    cfg = load_config(config_path, overrides)
    instance_predict(cfg)
    truth = np.load(folder / "ground_truth_labels.npy")
    with h5py.File(folder / "predictions" / f"{DEMO_STEM}_instance_preds.h5", "r") as f:
        found = f["instances"][...]
    result = DemoResult(
        n_true=len(np.unique(truth)) - 1,
        n_found=int(found.max()),
        n_matched=match_instances(truth, found),
        folder=folder,
    )
    return result
