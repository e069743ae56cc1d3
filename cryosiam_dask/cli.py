"""The ``cryosiam_dask`` command line: a thin Typer app over :mod:`cryosiam_dask.run.driver`.

Commands keep CryoSiam's spellings (``instance_predict --config_file ... --filename ...``) and add flags
that override the config's ``cryosiam_dask:`` section. torch, dask and the GPU stack are imported inside the
command bodies, so ``--help`` is instant. A :class:`~cryosiam_dask.errors.CryoSiamDaskError` (bad config,
missing file, a lost scheduler, ...) is printed as one ``error: ...`` line on stderr with exit code 2
(``--debug`` prints the cause's traceback first). A run in which tomograms failed (a task that raised, a dead
worker, an unreadable file) prints one ``error: ...`` line per failed tomogram and the summary, and exits
with code 3; the other tomograms are written. An exception outside a run's stages keeps its traceback.
"""

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from cryosiam_dask import __version__
from cryosiam_dask.errors import ConfigError, CryoSiamDaskError, InputFileError, TomogramsFailed

logger = logging.getLogger("cryosiam_dask")

app = typer.Typer(
    name="cryosiam_dask",
    help="CryoSiam-compatible instance segmentation of cryo-ET tomograms, chunked with dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Reusable options (copick-style). Every shape is (z, y, x).
ConfigFileOpt = Annotated[
    Path,
    typer.Option(
        "--config_file", "--config-file", help="CryoSiam instance_predict YAML.", show_default=False
    ),
]
FilenameOpt = Annotated[
    str | None,
    typer.Option("--filename", help="Process only this tomogram (a name in data_folder, or a path)."),
]
ChunkSizeOpt = Annotated[
    tuple[int, int, int] | None,
    typer.Option("--chunk-size", metavar="Z Y X", help="Chunk shape in voxels (default 128 256 256)."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda (default auto).")]
NWorkersOpt = Annotated[int | None, typer.Option("--n-workers", help="Local cluster workers (default auto).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Log at DEBUG level (default INFO), to stderr.")]

_HANDLER_MARK = "_cryosiam_dask_cli"


def _setup_logging(debug: bool) -> None:
    """Send the package's log records to the current stderr, at INFO (or DEBUG with ``--debug``)."""
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


@contextmanager
def _user_errors(debug: bool = False) -> Iterator[None]:
    """Turn a CryoSiamDaskError into one ``error: ...`` line on stderr and exit code 2.

    With ``debug``, the traceback of the error's cause (a task's exception, a dead worker) is printed first.
    """
    try:
        yield
    except TomogramsFailed as e:  # the run ended: one line per failed tomogram, then the summary
        for failure in e.failed:
            typer.echo(f"error: {failure.line()}", err=True)
        typer.echo(f"instance_predict: {e.summary} (exit code {e.exit_code})", err=True)
        raise typer.Exit(e.exit_code) from None
    except CryoSiamDaskError as e:
        if debug and e.__cause__ is not None:
            import traceback

            traceback.print_exception(e.__cause__, file=sys.stderr)
        message = " ".join(str(e).splitlines()) or type(e).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(e.exit_code) from None


class _OneLineRecords(logging.Filter):
    """One line of at most 300 characters per record on a stderr handler (a traceback: its last line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record to one line; never drop it."""
        from cryosiam_dask.run.failures import exception_line, one_line

        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text} ({exception_line(record.exc_info[1])})"
        record.msg, record.args = one_line(text, 300), None  # e.g. the list of every lost task's key
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


@contextmanager
def quiet_distributed_tracebacks() -> Iterator[None]:
    """While the CLI runs: distributed's log records in this process print one line each, no traceback."""
    import distributed  # noqa: F401  # its import installs the handlers filtered here

    logger_ = logging.getLogger("distributed")
    filt = _OneLineRecords()
    handlers = [h for h in logger_.handlers if isinstance(h, logging.StreamHandler)]
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryosiam_dask {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """CryoSiam-compatible instance segmentation of cryo-ET tomograms, chunked with dask."""


def _memory_limit(value: str | None) -> str | int | None:
    if value is None:
        return None
    if value.strip().lower() in ("none", "null", "0"):
        return 0  # dask: no limit
    return int(value) if value.strip().isdigit() else value.strip()


def _formats(value: str | None) -> list[str] | None:
    return None if value is None else [f.strip() for f in value.split(",") if f.strip()]


@app.command("instance_predict")
def instance_predict(
    config_file: ConfigFileOpt,
    filename: FilenameOpt = None,
    chunk_size: ChunkSizeOpt = None,
    halo: Annotated[
        int | None, typer.Option("--halo", help="Context voxels for the instance step (default 32).")
    ] = None,
    tiling: Annotated[
        str | None, typer.Option("--tiling", help="exact (default): CryoSiam's tiling; or fast.")
    ] = None,
    device: DeviceOpt = None,
    scheduler_address: Annotated[
        str | None,
        typer.Option("--scheduler-address", help="Use a running dask scheduler (tcp://host:8786)."),
    ] = None,
    scheduler_file: Annotated[
        Path | None,
        typer.Option(
            "--scheduler-file",
            help="Use the running dask scheduler of this scheduler file (JSON); with --slurm-runner, where "
            "rank 0 writes it (default <work_dir>/scheduler-<job id>.json).",
        ),
    ] = None,
    slurm_runner: Annotated[
        bool,
        typer.Option(
            "--slurm-runner",
            help="Run inside one SLURM allocation: every srun task runs this command; rank 0 the scheduler, "
            "rank 1 the run, the others dask workers (dask-jobqueue's SLURMRunner).",
        ),
    ] = False,
    n_workers: NWorkersOpt = None,
    threads_per_worker: Annotated[
        int | None, typer.Option("--threads-per-worker", help="Threads per local worker (default auto).")
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option("--memory-limit", help="Per-worker memory: '16GB', bytes, auto or none (default auto)."),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option("--work-dir", help="Intermediate stores (default <prediction_folder>/.cryosiam_dask)."),
    ] = None,
    work_dir_cleanup: Annotated[
        str | None,
        typer.Option(
            "--work-dir-cleanup",
            help="stale (default): after the run, stores of other settings; all: a tomogram's stores as soon "
            "as its outputs are written; keep: none.",
        ),
    ] = None,
    in_flight: Annotated[
        int | None,
        typer.Option("--tomograms-in-flight", help="Tomograms at once (default: workers + 1, >= 2)."),
    ] = None,
    formats: Annotated[
        str | None,
        typer.Option(
            "--formats", help="Comma list from cryosiam,raw,ome-zarr,mrc,star (default cryosiam,ome-zarr)."
        ),
    ] = None,
    amp: Annotated[
        str | None, typer.Option("--amp", help="bf16 | fp16 mixed precision (default off: float32).")
    ] = None,
    fast_window: Annotated[
        int | None, typer.Option("--fast-window", help="fast tiling: window edge (default 1.5x patch).")
    ] = None,
    fast_margin: Annotated[
        int | None, typer.Option("--fast-margin", help="fast tiling: context voxels (default patch/4).")
    ] = None,
    copick_config: Annotated[
        Path | None,
        typer.Option("--copick-config", help="copick project config: segment its runs."),
    ] = None,
    copick_runs: Annotated[
        str | None, typer.Option("--copick-runs", help="Comma list of copick runs (default: every run).")
    ] = None,
    voxel_spacing: Annotated[
        float | None, typer.Option("--voxel-spacing", help="copick voxel spacing in Å.")
    ] = None,
    tomo_type: Annotated[
        str | None, typer.Option("--tomo-type", help="copick tomogram type (e.g. denoised).")
    ] = None,
    copick_object: Annotated[
        str | None,
        typer.Option("--copick-object", help="copick pickable object the instances are written back as."),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Instance segmentation of every tomogram in the config (CryoSiam's instance_predict, same outputs).

    Flags override the config's optional cryosiam_dask: section.
    """
    _setup_logging(debug)
    overrides: dict[str, Any] = {
        "chunk_size": chunk_size,
        "halo": halo,
        "tiling": tiling,
        "device": device,
        "scheduler_address": scheduler_address,
        "scheduler_file": scheduler_file,
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker,
        "memory_limit": _memory_limit(memory_limit),
        "work_dir": work_dir,
        "work_dir_cleanup": work_dir_cleanup,
        "tomograms_in_flight": in_flight,
        "output_formats": _formats(formats),
        "amp": amp,
        "fast_window": fast_window,
        "fast_margin": fast_margin,
        "copick": {
            k: v
            for k, v in {
                "config": copick_config,
                "runs": [r.strip() for r in copick_runs.split(",") if r.strip()] if copick_runs else None,
                "voxel_spacing": voxel_spacing,
                "tomo_type": tomo_type,
                "object_name": copick_object,
            }.items()
            if v is not None
        }
        or None,
    }
    with _user_errors(debug):
        from cryosiam_dask.config import load_config

        cfg = load_config(config_file, overrides)
        files = cfg.validate_paths(filename)  # every input checked before anything is written
        logger.debug("%s: %d tomogram(s), settings %s", config_file, len(files), cfg.cryosiam_dask)

        from cryosiam_dask.run.driver import instance_predict as run_instance_predict
        from cryosiam_dask.run.progress import PROGRESS

        PROGRESS["on"] = sys.stderr.isatty()

        with contextlib.ExitStack() as stack:
            if not debug:  # dask's own records: one line each, the error line last
                stack.enter_context(quiet_distributed_tracebacks())
            on: dict[str, Any] = {}
            if slurm_runner:  # only rank 1 goes on; the scheduler and worker ranks exit in here
                from cryosiam_dask.run.slurm import runner_client

                on["client"] = stack.enter_context(runner_client(cfg))
            results = run_instance_predict(cfg, filename=filename, **on)
    logger.info(
        "instance_predict: %d tomogram(s) done, outputs in %s", len(results or []), cfg.prediction_folder
    )


# A hidden alias, for people who type dashes everywhere.
app.command("instance-predict", hidden=True)(instance_predict)


@app.command("convert")
def convert(
    tomogram: Annotated[Path, typer.Argument(help="MRC/REC tomogram (.mrc, .rec, optionally .gz/.bz2).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output OME-Zarr (default next to it, <stem>.zarr).")
    ] = None,
    chunk_size: ChunkSizeOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Convert a tomogram to a chunked OME-Zarr (streamed, so files larger than RAM work)."""
    _setup_logging(debug)
    with _user_errors():
        from cryosiam_dask.config import DaskSettings

        chunks = chunk_size if chunk_size is not None else DaskSettings().chunk_size
        if min(chunks) < 1:
            raise ConfigError(f"--chunk-size must be positive (z, y, x), found {tuple(chunks)}")
        if not tomogram.is_file():
            raise InputFileError(f"tomogram '{tomogram}' does not exist or is not a file")

        from cryosiam_dask.io.tomograms import stem_of, tomogram_to_zarr

        zarr_path = out if out is not None else tomogram.with_name(f"{stem_of(tomogram)}.zarr")
        array = tomogram_to_zarr(tomogram, zarr_path, chunk_size=tuple(chunks))
    logger.info("wrote %s: shape %s, chunks %s, %s", zarr_path, array.shape, array.chunks, array.dtype)


@app.command("demo")
def demo(
    folder: Annotated[
        Path | None, typer.Option("--folder", help="Where to write the demo (default ./cryosiam_dask_demo).")
    ] = None,
    shape: Annotated[
        tuple[int, int, int] | None,
        typer.Option("--shape", metavar="Z Y X", help="Synthetic tomogram shape (default 64 128 128)."),
    ] = None,
    device: DeviceOpt = None,
    n_workers: NWorkersOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Make a synthetic tomogram, lamella mask and tiny checkpoint, segment it and score the result."""
    _setup_logging(debug)
    options = {"folder": folder, "shape": shape, "device": device, "n_workers": n_workers}
    with _user_errors():
        from cryosiam_dask.demo import run_demo

        result = run_demo(**{k: v for k, v in options.items() if v is not None})
    typer.echo(
        f"demo: {result.n_found} instances found, {result.n_matched} of {result.n_true} particles matched "
        f"(IoU >= 0.5); files in {result.folder}"
    )


def main() -> None:
    """Console-script entry point (``cryosiam_dask``, ``python -m cryosiam_dask``)."""
    app()
