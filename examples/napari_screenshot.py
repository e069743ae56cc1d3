"""Screenshot of the napari tuning widget on the demo: tomogram slice, the crop's instances, the widget.

    python examples/napari_screenshot.py --out docs/images/napari_tuning.png

Needs the ``napari`` extra and an OpenGL display: on a headless machine run it under Xvfb with Qt's xcb
platform (``QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" python examples/...``); Qt's
``offscreen`` platform has no OpenGL canvas. Writes the demo's inputs and one ``instance_predict`` run into
``--folder`` (a temporary folder by default) first.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import yaml


def run_demo(folder: Path, shape: tuple[int, int, int] = (64, 128, 128)) -> Path:
    """The demo's inputs and one run (maps cached for the widget); returns the config."""
    from distributed import Client, LocalCluster

    from cryosiam_dask.config import load_config
    from cryosiam_dask.demo import write_demo_inputs
    from cryosiam_dask.run.driver import instance_predict

    config = write_demo_inputs(folder, shape=shape, stem="TS_01")
    cfg = yaml.safe_load(config.read_text())
    cfg["cryosiam_dask"] = {**cfg.get("cryosiam_dask", {}), "dashboard_address": None}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            instance_predict(load_config(config), client=client)
    return config


def screenshot(config: Path, out: Path) -> Path:
    """Open the viewer, dock the tuning widget, tune a crop drawn as a rectangle and save the window."""
    import napari

    from cryosiam_dask.napari.tuning import TuningWidget

    viewer = napari.Viewer(show=False, title="cryosiam_dask: tune instances on a crop")
    widget = TuningWidget(viewer, run_async=False)
    viewer.window.add_dock_widget(widget, name="Tune instances on a crop", area="right")
    widget.config.value = str(config)
    widget.tomogram.value = "TS_01"
    widget.load()
    viewer.layers["TS_01"].contrast_limits = (0.0, 1.0)
    shape = widget.session.maps.shape
    z, y0, y1 = shape[0] // 2, shape[1] * 3 // 16, shape[1] * 3 // 4
    x0, x1 = shape[2] // 6, shape[2] * 25 // 32
    rectangle = np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]])
    viewer.layers["crop"].add_rectangles(rectangle, edge_width=1.5, edge_color="yellow")
    widget.size[0].value = shape[0] // 2
    widget.crop_from_shapes()
    widget.update_crop()
    viewer.dims.set_point(0, viewer.layers["TS_01"].data_to_world([z, 0, 0])[0])
    viewer.layers.selection.active = viewer.layers["crop instances"]
    viewer.window._qt_window.resize(1600, 1000)
    viewer.reset_view()
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(out), canvas_only=False, flash=False)
    viewer.close()
    return out


def main() -> None:
    """Command line: ``--out`` PNG path, ``--folder`` for the demo run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/napari_tuning.png"))
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), help="demo tomogram (z, y, x)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="cryosiam_dask_napari_"))
    print(screenshot(run_demo(folder, tuple(args.shape)), args.out))


if __name__ == "__main__":
    main()
