"""Tomograms read in place from an OME-Zarr that is not a local file: an fsspec URL (``https://``, ``s3://``,
``file://``), such as a CZ cryoET Data Portal tomogram.

Nothing is copied or converted: the dask array reads scale 0 of the multiscale image region by region, with
the voxel size and origin of its ``multiscales`` metadata (NGFF 0.4 or 0.5). A reference is a small picklable
object (:class:`ZarrUrl`); the pipeline treats it like a file path (its ``name`` in messages, its ``stem`` for
outputs, :meth:`ZarrUrl.open_node` to read).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from cryosiam_dask.errors import ConfigError, InputFileError

__all__ = ["ZarrUrl", "is_url", "open_zarr_node", "url_stem"]

# fsspec protocols and the package each needs, for the one-line error when it is missing
_NEEDS = {"s3": "s3fs", "s3a": "s3fs", "http": "aiohttp", "https": "aiohttp"}


def is_url(name: str) -> bool:
    """Whether `name` is an fsspec URL (``scheme://...``) rather than a file name."""
    return "://" in str(name)


def url_stem(url: str) -> str:
    """Output stem of an OME-Zarr URL: its last path element without ``.ome.zarr`` / ``.zarr``.

    >>> url_stem("https://host/10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.zarr/")
    'TS_026'
    """
    name = posixpath.basename(url.split("?", 1)[0].rstrip("/"))
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_zarr_node(store_or_url: Any, *, storage_options: dict[str, Any] | None = None, name: str) -> Any:
    """Open a zarr group or array read-only from a URL or a zarr store; one-line errors naming `name`.

    A missing fsspec backend (``s3fs`` for ``s3://``, ``aiohttp`` for ``http(s)://``) is a
    :class:`~cryosiam_dask.errors.ConfigError` naming the ``copick`` extra that installs it.
    """
    import zarr

    options = dict(storage_options or {})
    if isinstance(store_or_url, str):
        protocol = store_or_url.split("://", 1)[0].lower()
        if protocol == "s3" and not options:
            options["anon"] = True  # the Data Portal's buckets are public; any option given: the user's own
        kwargs: dict[str, Any] = {"storage_options": options} if protocol != "file" and options else {}
        if protocol == "file":
            store_or_url = store_or_url[len("file://"):]
    else:
        kwargs = {}
    try:
        return zarr.open(store_or_url, mode="r", **kwargs)
    except ImportError as e:
        package = _NEEDS.get(str(store_or_url).split("://", 1)[0].lower(), e.name or "an fsspec backend")
        raise ConfigError(
            f"{name}: reading it needs {package}; install it with pip install 'cryosiam_dask[copick]'"
        ) from e
    except Exception as e:  # not found, not zarr, refused: name the URL and the cause
        text = " ".join(str(e).split()) or type(e).__name__
        what = f"{type(e).__name__}: {text}"
        raise InputFileError(f"{name}: not a readable zarr group or array ({what})") from e


@dataclass(frozen=True)
class ZarrUrl:
    """An OME-Zarr tomogram at an fsspec URL, read in place (scale 0).

    Attributes
    ----------
    url : str
        ``https://``, ``s3://`` (anonymous unless `storage_options` say otherwise) or ``file://`` URL of the
        multiscale group (or of a plain 3D array).
    storage_options : dict
        fsspec options (``{"anon": True}``, credentials, ``client_kwargs``...).
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """The URL, as messages name it."""
        return self.url

    @property
    def stem(self) -> str:
        """Output stem (see :func:`url_stem`)."""
        return url_stem(self.url)

    def open_node(self) -> Any:
        """The zarr group (or array) at the URL, read-only."""
        return open_zarr_node(self.url, storage_options=self.storage_options, name=self.url)

    def mask_reader(self, shape: tuple[int, int, int]) -> None:
        """No lamella mask travels with a URL (``mask_folder`` still applies, by stem)."""
        return None
