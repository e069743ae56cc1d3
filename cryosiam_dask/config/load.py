"""Reading a CryoSiam instance YAML into a validated :class:`~cryosiam_dask.config.schema.InstanceConfig`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cryosiam_dask.config.messages import _format_errors, _found
from cryosiam_dask.config.schema import IGNORED_KEYS, InstanceConfig
from cryosiam_dask.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

__all__ = ["load_config"]



def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> InstanceConfig:
    """Read and validate a CryoSiam instance YAML.

    Parameters
    ----------
    path : str or path-like
        The YAML file (CryoSiam's ``--config_file``).
    overrides : dict, optional
        ``cryosiam_dask`` settings (field name -> value, e.g. from CLI flags), applied on top of the file's
        ``cryosiam_dask:`` section and validated the same way. None values are skipped.

    Returns
    -------
    InstanceConfig
        With :attr:`InstanceConfig.source` set to ``path``.

    Raises
    ------
    InputFileError
        The file does not exist.
    ConfigError
        YAML syntax error, unknown, missing or mistyped key; one line naming the file and the dotted key.
    """
    src = str(path)
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise InputFileError(f"config file '{src}' does not exist or is not a file") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{src}: invalid YAML{where}: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: expected a mapping of keys at the top level, found {_found(data)}")
    for key in sorted(IGNORED_KEYS & data.keys()):
        logger.debug("%s: ignoring key '%s' (used by other CryoSiam apps)", src, key)
        data.pop(key)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if overrides:
        section = data.get("cryosiam_dask")
        merged = dict(section) if isinstance(section, dict) else {}
        for key, value in overrides.items():  # a nested override (copick flags) completes the file's block
            both = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both else value
        data["cryosiam_dask"] = merged
    try:
        cfg = InstanceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            _format_errors(e, data, src, set(overrides), root=InstanceConfig, ignored_keys=IGNORED_KEYS)
        ) from e
    cfg._source = Path(path)
    return cfg
