"""bench_slurm at a tiny size on the test SLURM: a smoke test (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_bench_slurm_smoke(tmp_path, capsys):
    from benchmarks.bench_slurm import main

    rows = main(["--shape", "32", "64", "64", "--runs", "local", "runner", "--out", str(tmp_path)])
    assert "| runner |" in capsys.readouterr().out
    assert [r["run"] for r in rows] == ["local", "runner"]
    assert all(r["same_instances"] and r["wall_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "bench_slurm_32x64x64.json").read_text())["results"]
