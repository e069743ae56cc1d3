"""Pydantic models of CryoSiam's ``instance_predict`` YAML, plus our optional ``cryosiam_dask:`` section.

An unchanged CryoSiam config is valid here. Keys are checked strictly: a misspelt or misplaced key, a missing
required key or a value of the wrong type raises :class:`~cryosiam_dask.errors.ConfigError` with one line
naming the file and the dotted key. Keys that other CryoSiam apps keep in the same file (``filtering_*``,
the dev example's ``instance_labels_folder`` ...) are listed in :data:`IGNORED_KEYS`, accepted and ignored.

Relative paths are taken relative to the current working directory, as in CryoSiam (which passes them to
``open()``), and stored absolute.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    field_validator,
    model_validator,
)

from cryosiam_dask._types import DEFAULT_CHUNKS
from cryosiam_dask.errors import ConfigError, InputFileError, ParameterError
from cryosiam_dask.instances.params import PostParams

logger = logging.getLogger(__name__)

__all__ = ["IGNORED_KEYS", "DaskSettings", "InstanceConfig"]

IGNORED_KEYS: frozenset[str] = frozenset({
    # instance_filter (filtering_instances.py) and the docs' tutorial config
    "filtering_mask_folder", "filtering_mask_expand_voxels", "filtering_mask_labels",
    "filtering_mask_extension", "filtering_expand_labels",
    # apps/dense_simsiam_instance/config_predict.yaml and config_test.yaml (evaluation only)
    "instance_labels_folder", "eval_skip_prediction",
})  # fmt: skip
"""Top-level keys used by other CryoSiam apps in the same file: accepted, logged at debug level, ignored."""

Float = Annotated[float, Strict()]  # accepts int and float, rejects "0.4" and true
Int = Annotated[int, Strict()]
PosInt = Annotated[int, Strict(), Field(ge=1)]
Bool = Annotated[bool, Strict()]
OutputFormat = Literal["cryosiam", "raw", "ome-zarr", "mrc", "star"]


def _abs_path(p: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(p)))


AbsPath = Annotated[Path, AfterValidator(_abs_path)]


def _empty_to_none(v: Any) -> Any:
    return None if v == "" else v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParameters(_Model):
    """``parameters.data``: ``clip((x - min) / (max - min), 0, 1)``, then ``(x - mean) / std``."""

    patch_size: Int | list[Int] | None = None
    """Accepted and ignored, as in CryoSiam: the window size comes from the checkpoint."""
    min: Float | None
    max: Float | None
    mean: Float | None
    """null: the volume's own mean."""
    std: Float | None
    """null: the volume's own (population) standard deviation."""


class NetworkParameters(_Model):
    """``parameters.network``: the post-processing settings (see ``instances.instance_segmentation``)."""

    in_channels: Int | None = None
    """Ignored (the architecture comes from the checkpoint)."""
    spatial_dims: Int | None = None
    """Ignored (always 3)."""
    threshold_foreground: Float
    boundary_bias: Float
    min_center_distance: Float
    max_center_distance: Float
    distance_type: Int
    postprocessing: Bool = True
    """Multicut step; default True when the key is absent, as in CryoSiam."""


class Parameters(_Model):
    """``parameters``."""

    gpu_devices: Int | list[Int] | None = None
    """Ignored by CryoSiam (it always uses cuda:0); here, the GPUs the local cluster may use."""
    data: DataParameters
    network: NetworkParameters


class HyperParameters(_Model):
    """``hyper_parameters``."""

    batch_size: PosInt
    """Patches per network call."""


class CopickSettings(_Model):
    """``cryosiam_dask.copick``: segment the runs of a copick project and write the instances back into it."""

    config: AbsPath
    """The project's copick config (JSON: filesystem, overlay or CZ cryoET Data Portal)."""
    runs: list[str] | None = None
    """Run names; default None = every run of the project."""
    voxel_spacing: Annotated[float, Field(gt=0)]
    """Å; the voxel spacing whose tomogram is segmented (and where the segmentation is written)."""
    tomo_type: str
    """Tomogram type to segment (``denoised``, ``wbp`` ...; CryoSiam expects a denoised, [0, 1]-scaled
    one)."""
    object_name: str
    """Pickable object of the project the instances are written as: an instance segmentation named after it
    and picks of it (its label, colour and radius come from the project)."""
    lamella_segmentation: str | None = None
    """Name of a binary or multilabel segmentation of each run used as its lamella mask (label > 0 = inside);
    default None = no mask (``mask_folder`` is then used, by run name, if set)."""
    lamella_user_id: str | None = None
    """The lamella segmentation's user, when several users wrote one of that name."""
    lamella_session_id: str | None = None
    """The lamella segmentation's session, when several exist."""
    user_id: str = "cryosiam-dask"
    """User id of the segmentation and picks written back (copick names may not contain '_')."""
    session_id: str = "0"
    """Session id of what is written back; '0' marks a tool's output. A rerun replaces only the segmentation
    and picks of this user and session."""


class DaskSettings(_Model):
    """Our optional ``cryosiam_dask:`` section; every field has a default: CryoSiam files need none of it."""

    chunk_size: tuple[PosInt, PosInt, PosInt] = DEFAULT_CHUNKS
    """(z, y, x) voxels per chunk, default (128, 256, 256): 32 MiB of float32, several network patches."""
    halo: Annotated[int, Strict(), Field(ge=0)] = 32
    """Voxels of context around each chunk for the instance step, default 32: whole particles fit in it."""
    tiling: Literal["fast", "exact"] = "exact"
    """'exact' (default): CryoSiam's tiling and maps, each patch once; 'fast': big windows, for throughput."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (default): CUDA when torch sees a GPU, else CPU."""
    scheduler_address: str | None = None
    """Address of an existing dask scheduler; default None starts a local cluster."""
    scheduler_file: AbsPath | None = None
    """Scheduler file of an existing scheduler (JSON with its address, written by ``dask scheduler
    --scheduler-file`` or dask-jobqueue); default None. With the CLI's ``--slurm-runner``: where rank 0 writes
    it (default <work_dir>/scheduler-<job id>.json)."""
    n_workers: PosInt | None = None
    """Local cluster workers; default None: one per GPU, or dask's choice on CPU."""
    threads_per_worker: PosInt | None = None
    """Threads per local worker; default None: dask's choice."""
    memory_limit: str | Int | None = "auto"
    """Per-worker memory limit ('4GB', bytes, 'auto' (default) = share of the machine, None = no limit)."""
    dashboard_address: str | None = "127.0.0.1:8787"
    """Dask dashboard, default '127.0.0.1:8787': localhost only, not exposed to the network; None = off."""
    work_dir: AbsPath | None = None
    """Intermediate zarr stores; default None = <prediction_folder>/.cryosiam_dask."""
    work_dir_cleanup: Literal["stale", "keep", "all"] = "stale"
    """What is removed from work_dir/<stem>: 'stale' (default, after a successful run) the stores of other
    settings or inputs (a changed setting, a new checkpoint), keeping the ones it used so a rerun (e.g. a new
    threshold) is instant; 'all' every store of a tomogram and its zarr conversion as soon as its outputs are
    written (the least disk: outputs only; a rerun recomputes); 'keep' nothing. Only our own store names are
    removed, never while another run uses the stem's work_dir."""
    tomograms_in_flight: PosInt | None = None
    """Tomograms whose chains (inputs -> maps -> instances -> multicut -> outputs) run at once; default None =
    the cluster's workers + 1 (at least 2): one tomogram's post-processing overlaps the next one's network,
    and outputs appear tomogram by tomogram. Each tomogram in flight holds its intermediate stores on disk."""
    paused_timeout: Annotated[float, Field(gt=0)] = 600.0
    """Seconds every dask worker may stay paused (distributed pauses a worker at 80 % of its memory_limit)
    before the run stops with one line naming memory, default 600."""
    output_formats: Annotated[list[OutputFormat], Field(min_length=1)] = ["cryosiam", "ome-zarr"]
    """Outputs to write, default ['cryosiam', 'ome-zarr']: CryoSiam's h5 + csv (read by its later steps) and a
    viewable OME-Zarr. Also 'raw' (the raw maps h5), 'mrc' (labels as MRC) and 'star' (centroids)."""
    fast_window: PosInt | None = None
    """'fast' tiling: largest edge of the network's input windows (multiple of 8); default None = 1.5x the
    checkpoint's patch, at least 96, at most 192 (a 128^3 window of the real architecture needs 4 GB)."""
    fast_margin: Annotated[int, Strict(), Field(ge=0)] | None = None
    """'fast' tiling: context voxels kept around each window's output; default None = patch/4 (rounded up to
    8), the smallest context any kept voxel of CryoSiam's own tiling has."""
    amp: Literal["bf16", "fp16"] | None = None
    """Mixed precision for the network; default None = float32, as CryoSiam (needed for its exact maps)."""
    copick: CopickSettings | None = None
    """Tomograms from a copick project instead of ``data_folder`` (see :class:`CopickSettings`)."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for tomograms given as URLs in ``test_files`` (``s3://``, ``https://``); default None
    (``s3://`` then reads anonymously, as the CZ cryoET Data Portal's public buckets need; options given are
    used as they are)."""

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _three_values(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) != 3:
            raise ValueError("expected 3 values (z, y, x)")
        return v

    @model_validator(mode="after")
    def _one_scheduler(self) -> DaskSettings:
        if self.scheduler_address and self.scheduler_file:
            raise ValueError("set 'scheduler_address' or 'scheduler_file', not both")
        return self


class InstanceConfig(_Model):
    """CryoSiam's ``instance_predict`` config (same keys, same meaning), plus ``cryosiam_dask``."""

    data_folder: AbsPath | None = None
    """Required unless ``cryosiam_dask.copick`` is set or every ``test_files`` entry is a URL."""
    mask_folder: AbsPath | None = None
    """Lamella masks ``<stem>_preds.h5['labels']``; '' or null = no mask."""
    log_dir: AbsPath | None = None
    prediction_folder: AbsPath
    trained_model: AbsPath | None = None
    """Checkpoint; null or absent = ``log_dir/model/model_best.ckpt`` (see :attr:`checkpoint_path`)."""
    file_extension: str | None = None
    """Required unless ``cryosiam_dask.copick`` is set."""
    test_files: list[str] | None = None
    """File names inside data_folder (or OME-Zarr URLs); null = every file there ending with file_extension.
    Required (it may be null) unless ``cryosiam_dask.copick`` is set."""
    save_raw_predictions: Bool
    semantic_predictions: AbsPath | None = None
    """Folder of ``<stem>_preds.h5['labels']``; if set, fg = isin(labels, semantic_foreground_labels)."""
    semantic_foreground_labels: list[Int] | None = None
    parameters: Parameters
    hyper_parameters: HyperParameters
    cryosiam_dask: DaskSettings = Field(default_factory=DaskSettings)

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("mask_folder", "trained_model", "semantic_predictions", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return _empty_to_none(v)

    @field_validator("cryosiam_dask", mode="before")
    @classmethod
    def _empty_section(cls, v: Any) -> Any:
        return {} if v is None else v  # "cryosiam_dask:" with every key commented out

    @field_validator("semantic_foreground_labels", mode="before")
    @classmethod
    def _one_label(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _cross_checks(self) -> InstanceConfig:
        if self.cryosiam_dask.copick is None:
            urls_only = bool(self.test_files) and all("://" in f for f in self.test_files)
            if "test_files" not in self.model_fields_set:
                raise ValueError("missing required key 'test_files'")
            if self.data_folder is None and not urls_only:
                raise ValueError("missing required key 'data_folder'")
            if self.file_extension is None:
                raise ValueError("missing required key 'file_extension'")
        if self.file_extension == "":
            raise ValueError("'file_extension' must not be empty (e.g. '.mrc')")
        if self.trained_model is None and self.log_dir is None:
            raise ValueError(
                "missing required key 'trained_model' (or 'log_dir', for log_dir/model/model_best.ckpt)"
            )
        if self.semantic_predictions is not None and not self.semantic_foreground_labels:
            raise ValueError(
                "'semantic_predictions' is set but 'semantic_foreground_labels' is missing or empty"
            )
        try:
            self.post_params  # noqa: B018  # the post-processing's own checks (halo vs reach), before any work
        except ParameterError as e:
            key = "cryosiam_dask.halo" if e.parameter == "halo" else f"parameters.network.{e.parameter}"
            raise ValueError(f"{key} {e.problem}") from None
        return self

    @property
    def post_params(self) -> PostParams:
        """CryoSiam's post-processing keys and our halo, as the pipeline's :class:`PostParams`."""
        n = self.parameters.network
        return PostParams(
            threshold_foreground=n.threshold_foreground,
            min_center_distance=n.min_center_distance,
            max_center_distance=n.max_center_distance,
            distance_type=n.distance_type,
            boundary_bias=n.boundary_bias,
            postprocessing=n.postprocessing,
            halo=self.cryosiam_dask.halo,
        )

    @property
    def source(self) -> Path | None:
        """The YAML file this config was read from (None when built in code)."""
        return self._source

    @property
    def checkpoint_path(self) -> Path:
        """``trained_model``, or ``log_dir/model/model_best.ckpt`` when it is unset (CryoSiam's fallback)."""
        if self.trained_model is not None:
            return self.trained_model
        if self.log_dir is None:  # only when built with model_construct, which skips _cross_checks
            raise ConfigError(f"{self._source or 'config'}: neither 'trained_model' nor 'log_dir' is set")
        return self.log_dir / "model" / "model_best.ckpt"

    @property
    def work_dir(self) -> Path:
        """Intermediate stores: ``cryosiam_dask.work_dir``, else ``<prediction_folder>/.cryosiam_dask``."""
        return self.cryosiam_dask.work_dir or self.prediction_folder / ".cryosiam_dask"

    def stem(self, tomogram: Path | str | Any) -> str:
        """Output stem of a tomogram: its name cut at ``file_extension``, as CryoSiam does (a URL or copick
        reference has its own: the URL's last element without ``.zarr``, or the run name)."""
        if not isinstance(tomogram, (str, os.PathLike)):
            return tomogram.stem
        name = Path(tomogram).name
        return name if self.file_extension is None else name.split(self.file_extension)[0]

    def _references(self, filename: str | None) -> list[Any] | None:
        """copick runs, or OME-Zarr URLs, as references read in place; None when the inputs are files."""
        cp = self.cryosiam_dask.copick
        if cp is not None:
            from cryosiam_dask.io.copick import LamellaRef, copick_tomograms

            lamella = (
                None
                if cp.lamella_segmentation is None
                else LamellaRef(cp.lamella_segmentation, cp.lamella_user_id, cp.lamella_session_id)
            )
            return copick_tomograms(
                cp.config, runs=cp.runs, voxel_spacing=cp.voxel_spacing, tomo_type=cp.tomo_type,
                object_name=cp.object_name, lamella=lamella, filename=filename,
            )
        names = [filename] if filename is not None else (self.test_files or [])
        if not names or not any("://" in n for n in names):
            return None
        from cryosiam_dask.io.remote import ZarrUrl

        options = self.cryosiam_dask.storage_options or {}
        refs = [ZarrUrl(n, options) for n in names if "://" in n]
        if len(refs) < len(names):
            raise ConfigError(
                f"{self._source or 'config'}: 'test_files' mixes URLs and file names; use one kind per config"
            )
        stems = [r.stem for r in refs]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise ConfigError(f"{self._source or 'config'}: 'test_files' URLs share the stem(s) {twice}")
        return refs

    def input_files(self, filename: str | None = None) -> list[Path | Any]:
        """Tomograms to process, with CryoSiam's rules.

        With ``cryosiam_dask.copick`` set: the project's runs as
        :class:`~cryosiam_dask.io.copick.CopickTomogram` references (``filename`` = one run name); with
        URLs in ``test_files`` (or as ``filename``): :class:`~cryosiam_dask.io.remote.ZarrUrl` references.
        Both are read in place.

        ``test_files`` (names inside ``data_folder``) when it is a list; when null, every file in
        ``data_folder`` ending with ``file_extension``, sorted. ``filename`` (the CLI's ``--filename``)
        replaces the list with one file, given as a name inside ``data_folder`` or as a path.

        Returns
        -------
        list of pathlib.Path
            Absolute paths of existing files, in processing order.

        Raises
        ------
        InputFileError
            ``data_folder`` or a listed file does not exist, or no file in ``data_folder`` has the extension.
        ConfigError
            ``test_files`` is empty or names the same tomogram twice.
        """
        refs = self._references(filename)
        if refs is not None:
            return refs
        src = self._source or "config"
        folder = self.data_folder
        if folder is None:  # only with URLs (checked at load)
            raise ConfigError(f"{src}: missing required key 'data_folder'")
        if filename is not None:
            for candidate in (folder / filename, _abs_path(Path(filename))):
                if candidate.is_file():
                    return [candidate]
            raise InputFileError(
                f"--filename '{filename}' does not exist (looked in data_folder '{folder}' "
                f"and at '{_abs_path(Path(filename))}')"
            )
        if not folder.is_dir():
            raise InputFileError(f"{src}: data_folder '{folder}' does not exist or is not a folder")
        if self.test_files is None:
            files = sorted(
                p for p in folder.iterdir() if p.name.endswith(self.file_extension) and p.is_file()
            )
            if not files:
                raise InputFileError(
                    f"{src}: no file ending with '{self.file_extension}' in data_folder '{folder}'"
                )
            return files
        if not self.test_files:
            raise ConfigError(
                f"{src}: 'test_files' is an empty list (use null for every file in data_folder)"
            )
        files, seen = [], {}
        for name in self.test_files:
            path = _abs_path(folder / name)
            if path in seen:
                raise ConfigError(
                    f"{src}: 'test_files' lists the same tomogram twice: '{seen[path]}' and '{name}'"
                )
            if not path.is_file():
                raise InputFileError(
                    f"{src}: test_files entry '{name}' does not exist in data_folder '{folder}'"
                )
            seen[path] = name
            files.append(path)
        return files

    def validate_paths(self, filename: str | None = None) -> list[Path | Any]:
        """Check every input path before any work starts: :meth:`input_files`, the checkpoint and the folders.

        Returns the :meth:`input_files` list. Raises :class:`InputFileError` naming the first missing path.
        """
        files = self.input_files(filename)
        ckpt = self.checkpoint_path
        if not ckpt.is_file():
            how = (
                "trained_model"
                if self.trained_model is not None
                else "trained_model not set, log_dir default"
            )
            raise InputFileError(f"checkpoint '{ckpt}' does not exist ({how})")
        for key in ("mask_folder", "semantic_predictions"):
            folder = getattr(self, key)
            if folder is not None and not folder.is_dir():
                raise InputFileError(
                    f"{self._source or 'config'}: {key} '{folder}' does not exist or is not a folder"
                )
        return files
