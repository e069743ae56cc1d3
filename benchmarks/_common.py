"""Shared benchmark helpers: peak memory of a process tree, tidy JSON results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from cryosiam_dask.run.monitor import Sampler


class PeakRSS(Sampler):
    """Sample the summed RSS of a process (default: this one) and all its children (dask workers) every
    ``interval`` s.

    Use as a context manager; ``peak`` (bytes) is the largest sum seen, ``per_process`` the largest RSS of
    each process seen (pid -> bytes).
    """

    def __init__(self, interval: float = 0.05, pid: int | None = None) -> None:
        super().__init__(interval)
        self.pid = pid
        self.peak = 0
        self.per_process: dict[int, int] = {}

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:  # the process has ended
            return
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.per_process[p.pid] = max(self.per_process.get(p.pid, 0), rss)
        self.peak = max(self.peak, total)

    @property
    def largest(self) -> int:
        """The largest RSS of one process seen (bytes)."""
        return max(self.per_process.values(), default=0)


def machine() -> dict[str, Any]:
    """The machine the figures came from."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_GiB": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_results(out: Path, name: str, config: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write ``<out>/<name>.json`` with the configuration, the machine and the result rows."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(
        json.dumps({"config": config, "machine": machine(), "results": rows}, indent=1, default=str)
    )
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Format ``rows`` as a Markdown table of ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def spawn_one(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m <module> --one <spec as JSON>`` in a fresh process and return the JSON it prints last.

    Each configuration gets its own process so that its peak RSS is not polluted by earlier runs.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, "--one", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
