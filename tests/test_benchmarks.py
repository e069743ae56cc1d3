"""The pipeline benchmark runs end to end at a tiny size (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_pipeline_smoke(tmp_path, capsys):
    from benchmarks.bench_pipeline import main

    main(["--shape", "24", "48", "48", "--chunks", "24", "48", "48", "--scales", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| original |" in printed and "cryosiam_dask exact x2" in printed
    results = json.loads((tmp_path / "bench_pipeline_tiny.json").read_text())["results"]
    names = [r.get("name") for r in results if "name" in r]
    assert names[0] == "original" and len(names) == 5
    counts = {r["n_instances"] for r in results}
    assert len(counts) == 1  # every implementation found the same number of instances on the same case
    assert all(r["peak_rss_MiB"] > 0 and r["compute_s"] > 0 for r in results)


@pytest.mark.slow
def test_bench_exact_smoke(tmp_path, capsys):
    from benchmarks.bench_exact import main

    rows = main(["--arch", "tiny", "--shape", "32", "48", "48", "--chunkings", "whole", "16,32,32",
                 "--lamella", "0.7", "0.3", "--workers", "1", "--out", str(tmp_path)])
    assert "| baseline |" in capsys.readouterr().out
    assert [(r["run"], r["lamella"]) for r in rows] == [
        ("baseline", 0.7), ("exact", 0.7), ("exact", 0.7), ("fast", 0.7), ("fast bf16", 0.7),
        ("baseline", 0.3), ("exact", 0.3)]
    for r in rows:
        if r["run"] == "exact":  # the same maps as the original's tiling, so the same instances
            assert r["instances_identical"] and r["distance_max_abs"] < 1e-4
        assert r["wall_s"] > 0 and r["largest_rss_GiB"] > 0
    assert json.loads((tmp_path / "bench_exact_32x48x48.json").read_text())["results"]


def test_fast_vs_golden(golden, capsys):
    from benchmarks.fast_vs_golden import main

    rows = main(["--golden", str(golden)])
    assert "| original |" in capsys.readouterr().out
    exact = next(r for r in rows if r["run"] == "exact")
    fast = next(r for r in rows if r["run"] == "fast")
    assert exact["identical_ids"] and exact["dist_max"] < 1e-4  # exact reproduces the original
    assert 0 < fast["f1"] <= 1 and fast["same_fg_decision"] > 0.99
