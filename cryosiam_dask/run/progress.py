"""``dask.compute`` with an optional progress bar (the CLI turns it on in a terminal)."""

from __future__ import annotations

import sys
from typing import Any

import dask

PROGRESS = {"on": False}
"""Set ``PROGRESS["on"] = True`` for progress bars on stderr."""


def compute(*objs: Any) -> tuple[Any, ...]:
    """``dask.compute`` with a progress bar on stderr when ``PROGRESS["on"]``.

    On a distributed client the bar is ``distributed.progress`` over the futures; otherwise dask's local
    ``ProgressBar``.
    """
    if not PROGRESS["on"]:
        return dask.compute(*objs)
    try:
        from distributed import get_client, progress

        client = get_client()
    except (ImportError, ValueError):
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return dask.compute(*objs)
    futures = client.compute(list(objs))
    progress(futures)
    print(file=sys.stderr)
    return tuple(client.gather(futures))
