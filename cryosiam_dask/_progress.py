"""Whether stages show progress bars (the CLI turns it on in a terminal; notebooks use the dashboard)."""

from __future__ import annotations

PROGRESS = {"on": False}
"""Set ``PROGRESS["on"] = True`` for progress bars on stderr."""
