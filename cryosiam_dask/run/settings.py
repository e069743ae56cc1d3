"""The one seam where the config enters the pipeline: frozen settings per stage, built once per run.

Every stage and library function takes its own typed parameters; they are named like the config's leaf keys
(``threshold_foreground``, ``min_center_distance``, ``halo`` ...). A library's :class:`ParameterError` names
its parameter; :func:`user_error` turns it into the config key a user writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryosiam_dask._types import ShapeZYX
from cryosiam_dask.config import InstanceConfig
from cryosiam_dask.errors import ConfigError, ParameterError
from cryosiam_dask.instances.params import PostParams

__all__ = [
    "CONFIG_KEYS",
    "ClusterSettings",
    "InputSettings",
    "InstanceSettings",
    "NetworkSettings",
    "OutputSettings",
    "RunSettings",
    "user_error",
]

CONFIG_KEYS = {
    **{
        k: f"parameters.network.{k}"
        for k in (
            "threshold_foreground",
            "boundary_bias",
            "min_center_distance",
            "max_center_distance",
            "distance_type",
            "postprocessing",
        )
    },
    **{
        k: f"cryosiam_dask.{k}"
        for k in ("halo", "tiling", "chunk_size", "device", "amp", "fast_window", "fast_margin")
    },
    "batch_size": "hyper_parameters.batch_size",
    "data": "parameters.data",
    "mask": "mask_folder",
}
"""Library parameter name -> the config key that sets it."""


def user_error(e: ParameterError) -> ConfigError:
    """The config-key form of a library's parameter error (one line)."""
    return ConfigError(f"{CONFIG_KEYS.get(e.parameter, e.parameter)} {e.problem}")


@dataclass(frozen=True)
class InputSettings:
    """How tomograms and masks are opened."""

    work_dir: Path
    chunk_size: ShapeZYX
    file_extension: str
    mask_folder: Path | None
    data_min: float | None
    data_max: float | None
    work_dir_cleanup: str = "stale"
    """After a successful run: remove the stores it did not use ('stale'), all ('all') or none ('keep')."""


@dataclass(frozen=True)
class NetworkSettings:
    """The maps stage: checkpoint, tiling and normalisation (``parameters.data``)."""

    checkpoint: Path
    tiling: str
    data: tuple[float | None, float | None, float | None, float | None]
    batch_size: int
    amp: str | None
    fast_margin: int | None
    fast_window: int | None
    device: str
    patch_size: ShapeZYX | None = None

    def predict_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`cryosiam_dask.network.predict.predict_maps`."""
        return {
            "tiling": self.tiling,
            "data": self.data,
            "batch_size": self.batch_size,
            "device": self.device,
            "amp": self.amp,
            "margin": self.fast_margin,
            "window": self.fast_window,
            "patch_size": self.patch_size,
        }


@dataclass(frozen=True)
class InstanceSettings:
    """The instance stage: CryoSiam's post-processing (and the halo), and the semantic foreground override."""

    post: PostParams
    semantic_predictions: Path | None = None
    semantic_foreground_labels: tuple[int, ...] | None = None
    device: str = "cpu"
    """'cuda': each window goes to the worker's GPU once and is post-processed there (cupy/cuCIM)."""


@dataclass(frozen=True)
class OutputSettings:
    """Which files are written where."""

    prediction_folder: Path
    formats: frozenset[str]
    save_raw_predictions: bool
    copick: Any = None
    """``cryosiam_dask.copick`` (a :class:`~cryosiam_dask.config.schema.CopickSettings`): the instances are
    also written back into the project; None otherwise."""


@dataclass(frozen=True)
class ClusterSettings:
    """Where the run's tasks go and how the dataset is streamed (the cluster started or attached to)."""

    device: str
    scheduler_address: str | None
    scheduler_file: Path | None
    n_workers: int | None
    threads_per_worker: int | None
    memory_limit: Any
    gpu_devices: Any
    dashboard_address: str | None
    tomograms_in_flight: int | None
    """None: the cluster's workers + 1, at least 2."""
    paused_timeout: float


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, per stage; built once by :meth:`from_config`."""

    inputs: InputSettings
    network: NetworkSettings
    instances: InstanceSettings
    outputs: OutputSettings
    cluster: ClusterSettings

    @classmethod
    def from_config(
        cls, config: InstanceConfig, *, device: str, patch_size: ShapeZYX | None = None
    ) -> RunSettings:
        """Build the settings of every stage from a validated config (`device` resolved, the checkpoint's
        `patch_size` read by validation)."""
        s, d = config.cryosiam_dask, config.parameters.data
        labels = config.semantic_foreground_labels
        return cls(
            inputs=InputSettings(
                work_dir=config.work_dir,
                chunk_size=tuple(s.chunk_size),  # type: ignore[arg-type]
                file_extension=config.file_extension,
                mask_folder=config.mask_folder,
                data_min=d.min,
                data_max=d.max,
                work_dir_cleanup=s.work_dir_cleanup,
            ),
            network=NetworkSettings(
                checkpoint=config.checkpoint_path,
                tiling=s.tiling,
                data=(d.min, d.max, d.mean, d.std),
                batch_size=config.hyper_parameters.batch_size,
                amp=s.amp,
                fast_margin=s.fast_margin,
                fast_window=s.fast_window,
                device=device,
                patch_size=patch_size,
            ),
            instances=InstanceSettings(
                post=config.post_params,
                semantic_predictions=config.semantic_predictions,
                semantic_foreground_labels=tuple(labels) if labels else None,
                device=device,
            ),
            cluster=ClusterSettings(
                device=device,
                scheduler_address=s.scheduler_address,
                scheduler_file=s.scheduler_file,
                n_workers=s.n_workers,
                threads_per_worker=s.threads_per_worker,
                memory_limit=s.memory_limit,
                gpu_devices=config.parameters.gpu_devices,
                dashboard_address=s.dashboard_address,
                tomograms_in_flight=s.tomograms_in_flight,
                paused_timeout=s.paused_timeout,
            ),
            outputs=OutputSettings(
                prediction_folder=config.prediction_folder,
                formats=frozenset(s.output_formats),
                save_raw_predictions=config.save_raw_predictions,
                copick=s.copick,
            ),
        )
