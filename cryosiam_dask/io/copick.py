"""copick projects as input: each run's tomogram read in place from the project's OME-Zarr (scale 0, voxel
size from its metadata), and optionally a lamella mask from a segmentation of the run.

A :class:`CopickTomogram` is a small picklable reference (config file, run, voxel spacing, tomogram type); the
pipeline treats it like a file path (``name`` in messages, ``stem`` = the run name for outputs,
:meth:`CopickTomogram.open_node` to read). :func:`copick_tomograms` checks a config's choice before any work:
a missing run, voxel spacing, tomogram type, lamella segmentation or pickable object is one error naming what
the project has. copick (2.0, zarr 3) is the optional ``copick`` extra, imported only here and in
:mod:`cryosiam_dask.outputs.copick`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryosiam_dask.errors import ConfigError, InputFileError
from cryosiam_dask.io.remote import open_zarr_node
from cryosiam_dask.io.tomograms import level0

__all__ = ["CopickTomogram", "LamellaRef", "copick_tomograms", "import_copick", "open_root"]

logger = logging.getLogger(__name__)

EXTRA = "pip install 'cryosiam_dask[copick]'"


def import_copick() -> Any:
    """The copick module, or a one-line :class:`ConfigError` naming the extra that installs it.

    copick 2.0's modules reconfigure the root logger when imported (``copick.util.log.get_logger`` calls
    ``logging.basicConfig(force=True)`` with a rich handler at INFO), and copick imports most of them lazily.
    The root logger's handlers and level are put back after the import, and ``get_logger`` is replaced by a
    plain ``logging.getLogger`` for the modules imported later: the CLI's and the user's logging stay theirs.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import copick
        import copick.util.log as copick_log

        copick_log.get_logger = _library_logger
    except ImportError as e:
        raise ConfigError(f"cryosiam_dask.copick needs copick 2.0 (not installed): {EXTRA}") from e
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return copick


def _library_logger(name: str, debug: bool = False) -> logging.Logger:
    """copick's ``get_logger`` without its root-logger configuration (a library's logger, nothing more)."""
    return logging.getLogger(name)


def open_root(config: Path) -> Any:
    """The copick root of a project config (cached per file and modification time, in this process)."""
    config = Path(config)
    if not config.is_file():
        raise InputFileError(f"cryosiam_dask.copick.config: copick config '{config}' does not exist")
    return _open_root(str(config), config.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _open_root(config: str, mtime_ns: int) -> Any:
    copick = import_copick()
    try:
        return copick.from_file(config)
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{config}: not a readable copick config ({type(e).__name__}: {text})") from e


def _listing(names: list[str]) -> str:
    names = sorted(str(n) for n in names)
    if not names:
        return "none"
    shown = ", ".join(names[:12])
    return shown if len(names) <= 12 else f"{shown}, ... ({len(names)} in all)"


@dataclass(frozen=True)
class LamellaRef:
    """A segmentation of each run used as its lamella mask (voxels > 0 are inside)."""

    name: str
    user_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class CopickTomogram:
    """One run's tomogram of a copick project, read in place.

    Attributes
    ----------
    config : Path
        The project's copick config (JSON; filesystem, overlay or Data Portal).
    run : str
        Run name; also the output stem.
    voxel_spacing : float
        Å; the voxel spacing holding the tomogram.
    tomo_type : str
        Tomogram type (``denoised``, ``wbp`` ...).
    lamella : LamellaRef or None
        A segmentation of the run used as the lamella mask.
    """

    config: Path
    run: str
    voxel_spacing: float
    tomo_type: str
    lamella: LamellaRef | None = None

    @property
    def name(self) -> str:
        """How messages name it: ``copick:<run>/VoxelSpacing<vs>/<tomo_type>``."""
        return f"copick:{self.run}/VoxelSpacing{self.voxel_spacing:.3f}/{self.tomo_type}"

    @property
    def stem(self) -> str:
        """Output stem: the run name."""
        return self.run

    def copick_run(self) -> Any:
        """The copick run object."""
        run = open_root(self.config).get_run(self.run)
        if run is None:
            raise InputFileError(f"{self.name}: run '{self.run}' not found in {self.config}")
        return run

    def open_node(self) -> Any:
        """The tomogram's OME-Zarr group, read-only."""
        tomogram = _tomogram(self.copick_run(), self.voxel_spacing, self.tomo_type, self.config)
        return open_zarr_node(tomogram.zarr(), name=self.name)

    def mask_reader(self, shape: tuple[int, int, int]) -> Any:
        """The lamella segmentation readable by region as int8 0/1 (see :class:`ZarrMask`), or None."""
        if self.lamella is None:
            return None
        seg = _lamella(self.copick_run(), self.voxel_spacing, self.lamella, self.config)
        where = f"copick:{self.run}/{seg.name} ({seg.user_id}, session {seg.session_id})"
        array = level0(open_zarr_node(seg.zarr(), name=where), where)
        if tuple(array.shape) != tuple(shape):
            raise InputFileError(
                f"{where}: lamella segmentation is {tuple(array.shape)} but the tomogram is {tuple(shape)}"
            )
        return ZarrMask(array, where)


class ZarrMask:
    """A segmentation read by region as the lamella mask: int8, 1 where the label is > 0. Picklable.

    A multilabel segmentation's labels are not mask factors (CryoSiam multiplies its maps by the mask), so
    every label counts as inside.
    """

    def __init__(self, array: Any, path: str) -> None:
        self.array, self.path = array, path
        self.shape, self.ndim, self.dtype = tuple(int(n) for n in array.shape), 3, np.dtype(np.int8)

    def __getitem__(self, index: object) -> np.ndarray:
        try:
            return (np.asarray(self.array[index]) > 0).astype(np.int8)
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            what = f"{type(e).__name__}: {text}"
            raise InputFileError(f"{self.path}: cannot read the lamella mask ({what})") from e


def _tomogram(run: Any, voxel_spacing: float, tomo_type: str, config: Path) -> Any:
    spacing = run.get_voxel_spacing(voxel_spacing)
    if spacing is None:
        have = _listing([f"{v.voxel_size:g}" for v in run.voxel_spacings])
        raise InputFileError(
            f"cryosiam_dask.copick.voxel_spacing: run '{run.name}' of {config} has no voxel spacing "
            f"{voxel_spacing:g} Å (it has: {have})"
        )
    tomogram = spacing.get_tomogram(tomo_type)
    if tomogram is None:
        have = _listing([t.tomo_type for t in spacing.tomograms])
        raise InputFileError(
            f"cryosiam_dask.copick.tomo_type: run '{run.name}' of {config} has no tomogram '{tomo_type}' at "
            f"{voxel_spacing:g} Å (it has: {have})"
        )
    return tomogram


def _lamella(run: Any, voxel_spacing: float, ref: LamellaRef, config: Path) -> Any:
    found = run.get_segmentations(
        name=ref.name, voxel_size=voxel_spacing, user_id=ref.user_id, session_id=ref.session_id
    )
    if not found:
        have = _listing(sorted({s.name for s in run.get_segmentations(voxel_size=voxel_spacing)}))
        raise InputFileError(
            f"cryosiam_dask.copick.lamella_segmentation: run '{run.name}' of {config} has no segmentation "
            f"'{ref.name}' at {voxel_spacing:g} Å (binary or multilabel; it has: {have})"
        )
    if len(found) > 1:
        who = _listing([f"{s.user_id}/{s.session_id}" for s in found])
        raise ConfigError(
            f"cryosiam_dask.copick.lamella_segmentation: run '{run.name}' has {len(found)} segmentations "
            f"'{ref.name}' ({who}); choose one with lamella_user_id and lamella_session_id"
        )
    return found[0]


def copick_tomograms(
    config: Path,
    *,
    runs: list[str] | None,
    voxel_spacing: float,
    tomo_type: str,
    object_name: str,
    lamella: LamellaRef | None = None,
    filename: str | None = None,
) -> list[CopickTomogram]:
    """The runs to segment, every choice checked against the project before any work.

    Parameters
    ----------
    config : Path
        copick config file.
    runs : list of str or None
        Run names; None = every run of the project, in copick's order.
    voxel_spacing : float
        Å.
    tomo_type : str
        Tomogram type.
    object_name : str
        Pickable object the instance segmentation and picks are written as.
    lamella : LamellaRef, optional
        Segmentation used as each run's lamella mask. A run without it is segmented unmasked (with a
        warning naming it); when no run has it, the name is taken as misspelt: an error listing the names.
    filename : str, optional
        The CLI's ``--filename``: one run name.

    Raises
    ------
    InputFileError, ConfigError
        One line naming the missing run, voxel spacing, tomogram type, segmentation or object and what exists.
    """
    _open_root.cache_clear()  # a new run sees the project as it is now (runs added since)
    root = open_root(config)
    names = [r.name for r in root.runs]
    wanted = [filename] if filename is not None else (list(runs) if runs else names)
    twice = sorted({r for r in wanted if wanted.count(r) > 1})
    if twice:
        raise ConfigError(f"cryosiam_dask.copick.runs: lists the same run twice: {', '.join(twice)}")
    missing = [r for r in wanted if r not in names]
    if missing:
        key = "--filename" if filename is not None else "cryosiam_dask.copick.runs"
        raise InputFileError(
            f"{key}: run(s) {', '.join(missing)} not in copick project {config} (runs: {_listing(names)})"
        )
    if not wanted:
        raise InputFileError(f"cryosiam_dask.copick: copick project {config} has no runs")
    objects = [o.name for o in root.pickable_objects]
    if object_name not in objects:
        raise ConfigError(
            f"cryosiam_dask.copick.object_name: '{object_name}' is not a pickable object of {config} "
            f"(objects: {_listing(objects)}); add one to the config's pickable_objects"
        )
    refs, unmasked = [], []
    for name in wanted:
        run = root.get_run(name)
        _tomogram(run, voxel_spacing, tomo_type, config)
        own = lamella
        if lamella is not None and not _has_lamella(run, voxel_spacing, lamella):
            own = None
            unmasked.append(name)
        refs.append(CopickTomogram(Path(config), name, float(voxel_spacing), tomo_type, own))
    if lamella is not None and len(unmasked) == len(refs):  # none has it: a misspelt name, not a choice
        _lamella(root.get_run(wanted[0]), voxel_spacing, lamella, config)
    if unmasked:
        logger.warning(
            "copick: run(s) %s have no segmentation '%s' at %g Å: segmented without a lamella mask",
            ", ".join(unmasked), lamella.name, voxel_spacing,
        )
    return refs


def _has_lamella(run: Any, voxel_spacing: float, ref: LamellaRef) -> bool:
    """Whether the run has the lamella segmentation; raises when the choice is ambiguous or unreadable."""
    try:
        _lamella(run, voxel_spacing, ref, Path("."))
    except InputFileError:
        return False
    return True
