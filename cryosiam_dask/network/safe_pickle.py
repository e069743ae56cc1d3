"""Safe unpickling of torch checkpoints: nothing named by the file is imported or run.

``torch.load(weights_only=True)`` is tried first. Real Lightning files whose optimizer/scheduler state names
other globals (torch 2.1's OneCycleLR pickles a bound method) are then read by :class:`_RestrictedUnpickler`,
whose ``find_class`` returns tensor-rebuild functions and plain containers as themselves and an inert stand-in
class (:class:`_Inert`) for every other global, never importing or calling it. :func:`_plain` turns what such
stand-ins collected back into plain dicts and lists.

Private module: :mod:`cryosiam_dask.network.model` (``load_checkpoint``) is the public door.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cryosiam_dask.errors import CheckpointError

logger = logging.getLogger(__name__)

class _Inert:
    """Stand-in for a global that the checkpoint names: records what it is given, imports and runs nothing."""

    _origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_inert_args", (args, kwargs))
        object.__setattr__(obj, "_inert_items", {})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_inert_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on e.g. Lightning's AttributeDict
        self._inert_items[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) on list subclasses
        self._inert_items[len(self._inert_items)] = value

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<inert {self._origin}>"


_SAFE_BUILTINS = {
    "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
    "bytearray", "slice", "range",
}


def _safe_rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch's tensor-subclass rebuild, allowed only for plain tensors and Parameters."""
    if new_type not in (torch.Tensor, nn.Parameter) or not callable(func) or isinstance(func, _Inert):
        return _stand_in("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _allowed_global(module: str, name: str) -> Any | None:
    """Return the real object for the few globals a checkpoint may name safely, else None."""
    if module == "builtins" and name in _SAFE_BUILTINS:
        return getattr(builtins, name)
    if module == "collections" and name in ("OrderedDict", "defaultdict"):
        return getattr(collections, name)
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
        return getattr(torch._utils, name)
    if module in ("torch._tensor", "torch.tensor") and name == "_rebuild_from_type_v2":
        return _safe_rebuild_from_type_v2
    if module == "torch" and name in ("Size", "device", "Tensor"):
        return getattr(torch, name)
    if module == "torch.nn.parameter" and name == "Parameter":
        return nn.Parameter
    constant_types = torch.dtype | torch.layout | torch.memory_format
    if module == "torch" and isinstance(getattr(torch, name, None), constant_types):
        return getattr(torch, name)
    if module == "_codecs" and name == "encode":
        import codecs

        return codecs.encode
    return None


def _stand_in(module: str, name: str) -> type:
    return type(f"Inert[{module}.{name}]", (_Inert,), {"_origin": f"{module}.{name}"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are tensor-rebuild functions, plain containers or inert stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's default) name Python 2 modules: __builtin__, copy_reg
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = _allowed_global(module, name)
        if obj is None:
            logger.debug("checkpoint names %s.%s: replaced by an inert stand-in", module, name)
            return _stand_in(module, name)
        return obj


class _RestrictedPickleModule:
    """Module-like object for ``torch.load(pickle_module=...)``."""

    Unpickler = _RestrictedUnpickler
    __name__ = "cryosiam_dask_restricted_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure: try the restricted unpickler
        logger.debug("%s: weights_only load failed (%s); using the restricted unpickler", path.name, e)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except Exception as e:  # noqa: BLE001 - anything unparseable becomes one CheckpointError
        raise CheckpointError(f"checkpoint {path} cannot be read as a torch checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e



def _plain(obj: Any) -> Any:
    """Turn mappings (including inert stand-ins that collected items, e.g. AttributeDict) into plain dicts."""
    items = getattr(obj, "_inert_items", None)
    origin = str(getattr(obj, "_origin", ""))
    if isinstance(items, dict) and not items and not origin.endswith("AttributeDict"):
        return obj  # an inert object that is not a mapping stays inert
    if isinstance(obj, Mapping) or isinstance(items, dict):
        return {k: _plain(v) for k, v in (obj.items() if isinstance(obj, Mapping) else items.items())}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
