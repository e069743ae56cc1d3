"""Writing tuned post-processing settings into a CryoSiam YAML, comments and key order kept (ruamel.yaml).

Only CryoSiam's own keys under ``parameters.network`` change (``threshold_foreground``,
``min_center_distance``, ``max_center_distance``, ``distance_type``, ``boundary_bias``, ``postprocessing``);
the file is read back with :func:`cryosiam_dask.config.load_config` before it replaces the target, so a
written file is always one ``instance_predict`` accepts.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryosiam_dask.errors import ConfigError
from cryosiam_dask.instances.params import PostParams

__all__ = ["POST_KEYS", "write_post_settings"]

POST_KEYS = (
    "threshold_foreground",
    "min_center_distance",
    "max_center_distance",
    "distance_type",
    "boundary_bias",
    "postprocessing",
)
"""The keys of ``parameters.network`` the tuning widget writes (CryoSiam's names)."""


def _value(new: Any, old: Any) -> Any:
    """`new` for YAML: an integral float stays an int where the file had an int (``1``, not ``1.0``)."""
    if isinstance(new, bool) or not isinstance(new, float):
        return new
    if isinstance(old, int) and not isinstance(old, bool) and new.is_integer():
        return int(new)
    return round(new, 6)


def _scalar(new: Any, old_text: str | None) -> str:
    """The YAML text of `new`, in the file's spelling of booleans (``False`` or ``false``)."""
    if isinstance(new, bool):
        text = "true" if new else "false"
        return text.capitalize() if old_text and old_text[:1].isupper() else text
    return repr(new)


def _edit_lines(text: str, network: Any, values: dict[str, Any]) -> str | None:
    """`text` with the network keys' values replaced in place (and absent keys added after the last one),
    everything else byte for byte; None where a value is not a one-line plain scalar (then ruamel dumps)."""
    lines = text.splitlines(keepends=True)
    if not network:
        return None
    edits, last, indent = {}, -1, None
    for key in network:
        line, col = network.lc.value(key)
        last = max(last, line)
        indent = indent if indent is not None else network.lc.key(key)[1]
        if key not in values:
            continue
        token = re.match(r"[^\s#'\"\[{][^\s#]*", lines[line][col:])
        if token is None:
            return None
        edits[line] = (col, token.end(), _scalar(values[key], token.group(0)))
    for line, (col, end, new) in edits.items():
        s = lines[line]
        lines[line] = s[:col] + new + s[col + end:]
    missing = [k for k in values if k not in network]
    if missing:
        if last < 0 or indent is None:
            return None
        newline = "\n" if lines[last].endswith("\n") else ""
        if not newline:
            lines[last] += "\n"
        add = [f"{' ' * indent}{k}: {_scalar(values[k], None)}\n" for k in missing]
        lines[last + 1 : last + 1] = add
    return "".join(lines)


def write_post_settings(
    config: str | os.PathLike[str], params: PostParams, *, out: str | os.PathLike[str] | None = None
) -> Path:
    """Write `params`' CryoSiam keys into the YAML `config` (or a copy at `out`), keeping its comments.

    The values of the keys are replaced on their own lines, so the rest of the file stays byte for byte
    (comments, quoting, ``null``/``False`` spellings); a key the file lacks is added after the last key of
    ``parameters.network``. Only where a value is not a one-line plain scalar is the file dumped again by
    ruamel.yaml (comments kept, some spellings normalised).

    Parameters
    ----------
    config : str or PathLike
        A CryoSiam instance YAML.
    params : PostParams
        The tuned settings; its halo is not written (it is ``cryosiam_dask.halo``, unchanged).
    out : str or PathLike, optional
        Where to write; default `config` itself.

    Returns
    -------
    Path
        The written file, validated by :func:`~cryosiam_dask.config.load_config`.

    Raises
    ------
    ConfigError
        The file is not a mapping with a ``parameters`` mapping, or the result does not validate (then
        nothing is written).
    """
    from ruamel.yaml import YAML

    from cryosiam_dask.config import load_config

    src, dst = Path(config), Path(out) if out is not None else Path(config)
    yaml = YAML()  # round trip: comments, order and quoting kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    original = src.read_text()
    data = yaml.load(original)
    if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict):
        raise ConfigError(f"{src}: expected a mapping with a 'parameters' mapping to write the settings into")
    network = data["parameters"].get("network")
    values = {key: _value(getattr(params, key), (network or {}).get(key)) for key in POST_KEYS}
    text = _edit_lines(original, network, values) if isinstance(network, dict) else None
    if text is None:
        if not isinstance(network, dict):
            data["parameters"]["network"] = network = {}
        network.update(values)
        buffer = io.StringIO()
        yaml.dump(data, buffer)
        text = buffer.getvalue()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    try:
        loaded = load_config(tmp)  # relative paths resolve as for the target: same folder, same cwd
        if loaded.post_params != replace(params, halo=loaded.post_params.halo):
            raise ConfigError(f"{dst}: the written settings do not read back as {params}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
