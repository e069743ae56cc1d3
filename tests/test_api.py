"""The quick-start notebook runs top to bottom."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "dashboard: http" in outputs
    found, true = (
        int(w)
        for w in outputs.split(" instances found; ")[0].split()[-1:]
        + outputs.split(" instances found; ")[1].split()[:1]
    )
    assert abs(found - true) <= 2, outputs


def test_segment_with_multicut_equals_cryosiam(golden, golden_maps):
    import dask
    import h5py
    import numpy as np

    import cryosiam_dask as csd

    fg, dist, bnd = golden_maps
    with dask.config.set(scheduler="synchronous"):
        labels = csd.segment(fg, dist, threshold_foreground=0.65, min_center_distance=1,
                             max_center_distance=4, distance_type=1, halo=24, boundary=bnd,
                             postprocessing=True, boundary_bias=0.8)
        got = labels.compute()
    with h5py.File(golden / "postprocessing" / "multicut_a_default.h5", "r") as f:
        assert np.array_equal(got, f["instances"][:])
