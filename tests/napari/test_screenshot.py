"""The README's screenshot script runs and draws the canvas (needs OpenGL: a display, or Xvfb)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("napari")
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "napari_screenshot.py"


def test_screenshot_script_draws_slice_labels_and_widget(tmp_path):
    out = tmp_path / "shot.png"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--folder", str(tmp_path / "demo"),
               "--shape", "32", "64", "64"]
    if not os.environ.get("DISPLAY"):
        if shutil.which("xvfb-run") is None:
            pytest.skip("no display and no xvfb-run: Qt's offscreen platform has no OpenGL canvas")
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", *command]
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "could not load the Qt platform plugin" in proc.stderr.lower():
        pytest.skip("Qt's xcb platform plugin cannot load (system xcb libraries missing)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from skimage.io import imread

    image = imread(out)
    assert image.shape[0] >= 800 and image.shape[1] >= 1200  # the window, widget docked
    canvas = image[200:700, 400:1000, :3]
    assert canvas.std() > 10  # the tomogram slice and labels drawn, not a blank canvas
