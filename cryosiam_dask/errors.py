"""Errors raised on bad user input or a failed run: one line, naming the file, key or cause, what was expected
and what was found."""

from __future__ import annotations


class CryoSiamDaskError(Exception):
    """Base class: the CLI prints the message on one line and exits with ``exit_code`` (2)."""

    exit_code = 2


class ConfigError(CryoSiamDaskError, ValueError):
    """A config file or setting is missing, misspelt or of the wrong type."""


class InputFileError(CryoSiamDaskError, FileNotFoundError):
    """An input file (tomogram, mask, checkpoint) is missing, unreadable or of the wrong shape."""


class CheckpointError(CryoSiamDaskError, ValueError):
    """A checkpoint is unsafe, of another CryoSiam app, or does not match the architecture."""


class OutputError(CryoSiamDaskError, OSError):
    """An output cannot be written (folder not writable, disk full, locked by another run)."""


class NotSupportedError(CryoSiamDaskError, NotImplementedError):
    """A requested option exists in CryoSiam but is not supported here (the message names the alternative)."""


class ParameterError(ConfigError):
    """A library function got a bad parameter value; ``parameter`` names it (the run layer maps it to a key).

    Parameters
    ----------
    parameter : str
        The function's parameter name (our parameters share the config's leaf names: ``halo``,
        ``min_center_distance`` ...).
    problem : str
        What is wrong, e.g. ``"must be a finite number, got nan"``.
    """

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


class ClusterError(CryoSiamDaskError, RuntimeError):
    """The dask cluster failed: a worker died (killed by the OS or out of memory), could not start or import
    the task modules, or the scheduler went away (:mod:`cryosiam_dask.run.failures`)."""


class TaskError(CryoSiamDaskError, RuntimeError):
    """A dask task raised: the message is its exception's type and text, on one line."""


class TomogramsFailed(CryoSiamDaskError):
    """A run ended with one or more tomograms failed (the others written); the CLI exits with code 3.

    Attributes
    ----------
    failed : list of TomogramFailure
        Each failed tomogram, its stage and its one-line cause (``.line()``).
    results : list of TomogramResult
        The tomograms that were written.
    """

    exit_code = 3

    def __init__(self, failed: list, results: list, summary: str) -> None:
        names = ", ".join(f.stem for f in failed)
        super().__init__(f"{len(failed)} tomogram(s) failed ({names}): {summary}")
        self.failed, self.results, self.summary = failed, results, summary
