"""One-line messages for pydantic validation errors of a config file (private helpers of ``config``).

Each message names the file (or "command line"), the dotted key, what was expected and what was found;
a misspelt key gets the nearest valid key (difflib), or the dotted path of a key put in the wrong section.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


def _found(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _unwrap(ann: Any) -> list[Any]:
    """The alternatives of an annotation, Annotated and Optional unpacked."""
    if get_origin(ann) is Annotated:
        return _unwrap(get_args(ann)[0])
    if get_origin(ann) in (Union, type(int | None)):
        return [a for arg in get_args(ann) for a in _unwrap(arg)]
    return [ann]


_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    Path: "a path",
    type(None): "null",
}


_PLURALS = {int: "integers", float: "numbers", str: "strings", Path: "paths"}


def _describe(ann: Any) -> str:
    words = []
    for alt in _unwrap(ann):
        if get_origin(alt) is Literal:
            words.append("one of " + ", ".join(repr(a) for a in get_args(alt)))
        elif get_origin(alt) in (list, tuple):
            item = _unwrap(get_args(alt)[0])[0]
            if get_origin(item) is Literal:
                words.append("a list of values from " + ", ".join(repr(a) for a in get_args(item)))
            else:
                words.append(f"a list of {_PLURALS.get(item, 'values')}")
        elif isinstance(alt, type) and issubclass(alt, BaseModel):
            words.append("a mapping of keys")
        else:
            words.append(_NAMES.get(alt, getattr(alt, "__name__", str(alt))))
    return " or ".join(dict.fromkeys(words))


def _model_of(ann: Any) -> type[BaseModel] | None:
    return next((a for a in _unwrap(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _walk(loc: tuple[Any, ...], data: Any, root: type[BaseModel]) -> tuple[list[Any], Any, Any]:
    """Follow `loc` through the input from the `root` model: (key parts found, the value there, its type)."""
    parts: list[Any] = []
    node, ann = data, root
    for el in loc:
        if isinstance(node, dict) and el in node:
            model = _model_of(ann)
            if model is None or el not in model.model_fields:
                break
            ann = model.model_fields[el].annotation
        elif isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node):
            lists = [a for a in _unwrap(ann) if get_origin(a) in (list, tuple)]
            ann = get_args(lists[0])[0] if lists else Any
        else:
            break
        parts.append(el)
        node = node[el]
    return parts, node, ann


def _dotted(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _all_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Leaf name -> dotted path, for every key of `model` (to point at a key put in the wrong section)."""
    keys: dict[str, str] = {}
    for name, field in model.model_fields.items():
        keys.setdefault(name, prefix + name)
        for alt in _unwrap(field.annotation):
            if isinstance(alt, type) and issubclass(alt, BaseModel):
                keys.update({k: v for k, v in _all_keys(alt, f"{prefix}{name}.").items() if k not in keys})
    return keys


def _format_one(
    err: dict[str, Any], data: dict[str, Any], src: str, overridden: set[str], root: type[BaseModel],
    ignored_keys: frozenset[str],
) -> tuple[str, str]:
    loc = tuple(err["loc"])
    parts, value, ann = _walk(loc, data, root)
    model = _model_of(ann)
    key = _dotted(parts)
    if len(parts) >= 2 and parts[0] == "cryosiam_dask" and parts[1] in overridden:
        src = "command line"
    kind, msg = err["type"], err["msg"]
    if kind == "missing" and len(parts) == len(loc) - 1 and isinstance(value, dict):
        return key, f"{src}: missing required key '{_dotted([*parts, loc[-1]])}'"
    if kind == "extra_forbidden" and len(parts) == len(loc) - 1 and model is not None:
        name = str(loc[-1])
        valid = list(model.model_fields)
        ignored = sorted(ignored_keys) if model is root else []
        close = difflib.get_close_matches(name, valid + ignored, n=1)
        elsewhere = _all_keys(root).get(name)
        hint = (
            f" (did you mean '{close[0]}'?)"
            if close
            else f" (did you mean '{elsewhere}'?)"
            if elsewhere
            else f" (valid keys here: {', '.join(valid)})"
        )
        return key, f"{src}: unknown key '{_dotted([*parts, loc[-1]])}'{hint}"
    if kind == "value_error" and not parts:
        return key, f"{src}: {msg.removeprefix('Value error, ')}"
    if kind == "literal_error":
        return key, f"{src}: invalid value for '{key}': expected {_describe(ann)}, found {_found(value)}"
    if kind.endswith("_type") or kind == "missing":
        return key, f"{src}: wrong type for '{key}': expected {_describe(ann)}, found {_found(value)}"
    msg = msg.removeprefix("Value error, ")
    return key, f"{src}: invalid value for '{key}': {msg[:1].lower() + msg[1:]}, found {_found(value)}"


def _format_errors(
    e: ValidationError, data: dict[str, Any], src: str, overridden: set[str], *, root: type[BaseModel],
    ignored_keys: frozenset[str],
) -> str:
    """One line for the first problem (errors on the same key merged), with a count of the others.

    `root` is the model `data` was validated against, `ignored_keys` its accepted-and-ignored top-level keys
    (offered as suggestions too); keys given on the command line (`overridden`, in ``cryosiam_dask``) are
    reported as coming from the command line, not from `src`.
    """
    lines: dict[str, str] = {}
    for err in e.errors():
        key, line = _format_one(err, data, src, overridden, root, ignored_keys)
        lines.setdefault(key, line)
    first, *rest = lines.values()
    return first + (f" (and {len(rest)} more problem{'s' * (len(rest) > 1)})" if rest else "")
