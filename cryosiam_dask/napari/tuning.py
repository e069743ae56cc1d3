"""The tuning widget: CryoSiam's post-processing on a crop from a run's cached maps, then written to the YAML.

Pick a config and one of its tomograms, load it (the tomogram layer and the maps a previous run left, see
:mod:`~cryosiam_dask.napari.session`), type a crop or draw a rectangle in the ``crop`` shapes layer, and
move the settings: the ``crop instances`` labels layer is recomputed in a thread
(:func:`~cryosiam_dask.instances.crop.segment_crop`, the whole run's partition on the crop). "Write settings"
puts them into the YAML (:func:`~cryosiam_dask.napari.settings_file.write_post_settings`).
"""

from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)

from cryosiam_dask.errors import CryoSiamDaskError
from cryosiam_dask.instances.crop import CropResult
from cryosiam_dask.instances.params import PostParams
from cryosiam_dask.napari.session import TuningSession

__all__ = ["TuningWidget"]

CROP_LAYER = "crop"
RESULT_LAYER = "crop instances"


class TuningWidget(Container):
    """Crop, settings, live instances of the crop, and "write settings" (a magicgui Container).

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Where the tomogram, the crop rectangle and the crop's instances are shown (a ``ViewerModel`` works
        too: only ``layers`` and ``add_*`` are used).
    run_async : bool, default True
        Compute each crop in a worker thread (napari's ``create_worker``); False computes it in the caller.
    """

    def __init__(self, viewer: napari.viewer.Viewer, run_async: bool = True) -> None:
        super().__init__(labels=True)
        self.viewer, self.run_async = viewer, run_async
        self.session: TuningSession | None = None
        self.geometry: tuple[tuple[float, ...], tuple[float, ...]] = ((1.0,) * 3, (0.0,) * 3)
        self.last: CropResult | None = None
        self._worker: Any = None
        self._pending = False
        self.config = FileEdit(label="config", mode="r", filter="*.yaml *.yml")
        # a callable: napari calls reset_choices on every layer change, which restores static choices
        self.tomogram = ComboBox(label="tomogram", choices=self._stems)
        self.load_button = PushButton(text="Load tomogram and cached maps")
        self.start = [SpinBox(label=f"crop {a} start", min=0, max=100_000) for a in "zyx"]
        self.size = [SpinBox(label=f"crop {a} size", min=1, max=100_000, value=64) for a in "zyx"]
        self.from_shapes = PushButton(text="Crop from drawn rectangle")
        self.threshold = FloatSlider(label="threshold_foreground", min=0.0, max=1.0, step=0.01, value=0.5)
        self.min_distance = FloatSpinBox(label="min_center_distance", min=0, max=100, step=0.5, value=1)
        self.max_distance = FloatSpinBox(label="max_center_distance", min=0, max=100, step=0.5, value=5)
        self.distance_type = ComboBox(label="distance_type", choices=[0, 1, 2], value=1)
        self.boundary_bias = FloatSpinBox(label="boundary_bias", min=0.01, max=1.0, step=0.05, value=0.8)
        self.multicut = CheckBox(text="postprocessing (multicut)", value=False)
        self.live = CheckBox(text="update on every change", value=True)
        self.update_button = PushButton(text="Update crop")
        self.out = FileEdit(label="write to", mode="w", filter="*.yaml *.yml", value="")
        self.write_button = PushButton(text="Write settings to config")
        self.status = Label(value="choose a config")
        self.extend([self.config, self.tomogram, self.load_button, *self.start, *self.size, self.from_shapes,
                     self.threshold, self.min_distance, self.max_distance, self.distance_type,
                     self.boundary_bias, self.multicut, self.live, self.update_button, self.out,
                     self.write_button, self.status])
        self.config.changed.connect(self._open_config)
        self.load_button.changed.connect(self.load)
        self.from_shapes.changed.connect(self.crop_from_shapes)
        self.update_button.changed.connect(self.update_crop)
        self.write_button.changed.connect(self.write_settings)
        for w in (*self.start, *self.size, self.threshold, self.min_distance, self.max_distance,
                  self.distance_type, self.boundary_bias, self.multicut):
            w.changed.connect(self._changed)

    # ----------------------------------------------------------------------------------------------- model
    def _open_config(self, path: Any = None) -> None:
        try:
            self.session = TuningSession(Path(self.config.value))
            self.tomogram.reset_choices()
        except CryoSiamDaskError as e:
            self.status.value = str(e)
            return
        self._set_params(self.session.config.post_params)
        self.status.value = f"{len(self.tomogram.choices)} tomogram(s); pick one and load it"

    def _stems(self, _: Any = None) -> list[str]:
        return sorted(self.session.tomograms()) if self.session is not None else []

    def _set_params(self, p: PostParams) -> None:
        with self.changed.blocked():
            for w, v in ((self.threshold, p.threshold_foreground), (self.min_distance, p.min_center_distance),
                         (self.max_distance, p.max_center_distance), (self.distance_type, p.distance_type),
                         (self.boundary_bias, p.boundary_bias), (self.multicut, p.postprocessing)):
                with w.changed.blocked():
                    w.value = v

    def params(self) -> PostParams:
        """The settings shown, with the config's halo (a ParameterError names a bad value)."""
        if self.session is None:
            raise CryoSiamDaskError("choose a config first")
        return self.session.params(
            threshold_foreground=float(self.threshold.value),
            min_center_distance=float(self.min_distance.value),
            max_center_distance=float(self.max_distance.value),
            distance_type=int(self.distance_type.value),
            boundary_bias=float(self.boundary_bias.value),
            postprocessing=bool(self.multicut.value),
        )

    def crop(self) -> tuple[tuple[int, int], ...]:
        """The crop (z, y, x) as (start, stop) voxel pairs, clipped to the tomogram."""
        shape = self.session.maps.shape if self.session and self.session.maps else (10**9,) * 3
        out = []
        for s, n, full in zip(self.start, self.size, shape, strict=True):
            a = min(int(s.value), full - 1)
            out.append((a, min(full, a + int(n.value))))
        return tuple(out)

    def set_crop(self, crop: Any) -> None:
        """Show `crop` ((start, stop) pairs, z, y, x) in the spin boxes (one update afterwards)."""
        for (a, b), s, n in zip(crop, self.start, self.size, strict=True):
            with s.changed.blocked(), n.changed.blocked():
                s.value, n.value = int(a), int(b) - int(a)
        self._changed()

    # ------------------------------------------------------------------------------------------- actions
    def load(self, _: Any = None) -> None:
        """Load the chosen tomogram (image layer), its cached maps and a ``crop`` shapes layer."""
        if self.session is None or not self.tomogram.value:
            self.status.value = "choose a config and a tomogram first"
            return
        stem = self.tomogram.value
        try:
            data, kwargs = self.session.tomogram_layer(stem)
            maps = self.session.load(stem)
        except CryoSiamDaskError as e:
            self.status.value = str(e)
            return
        self.geometry = (kwargs["scale"], kwargs["translate"])
        if stem in self.viewer.layers:
            self.viewer.layers.remove(stem)
        self.viewer.add_image(data, **kwargs)
        if CROP_LAYER not in self.viewer.layers:
            geometry = {"scale": kwargs["scale"], "translate": kwargs["translate"]}
            self.viewer.add_shapes(name=CROP_LAYER, ndim=3, edge_color="yellow", face_color="transparent",
                                   **geometry)
        shape = maps.shape
        centre = [max(0, (n - min(64, n)) // 2) for n in shape]
        self.status.value = f"{stem}: maps from {maps.source.name}, {shape}"
        self.set_crop([(c, c + min(64, n)) for c, n in zip(centre, shape, strict=True)])

    def crop_from_shapes(self, _: Any = None) -> None:
        """The crop from the last rectangle of the ``crop`` layer (y, x), its plane ± half the z size."""
        if CROP_LAYER not in self.viewer.layers or not len(self.viewer.layers[CROP_LAYER].data):
            self.status.value = f"draw a rectangle in the '{CROP_LAYER}' layer first"
            return
        vertices = np.asarray(self.viewer.layers[CROP_LAYER].data[-1])  # the layer's data = voxels
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        dz = int(self.size[0].value)
        z = int(round(float(lo[0]))) - dz // 2
        crop = [(max(0, z), max(0, z) + dz)]
        crop += [(max(0, int(np.floor(a))), int(np.ceil(b)) + 1) for a, b in zip(lo[1:], hi[1:], strict=True)]
        self.set_crop(crop)

    def _changed(self, _: Any = None) -> None:
        if self.live.value and self.session is not None and self.session.maps is not None:
            self.update_crop()

    def update_crop(self, _: Any = None) -> None:
        """Segment the crop with the shown settings (in a thread when `run_async`) and show it."""
        if self.session is None or self.session.maps is None:
            self.status.value = "load a tomogram first"
            return
        if self._worker is not None:  # one at a time; the latest settings run when it ends
            self._pending = True
            return
        try:
            crop, params = self.crop(), self.params()
        except CryoSiamDaskError as e:
            self.status.value = str(e)
            return
        self.status.value = "computing ..."
        if not self.run_async:
            self._finish(self.session.segment(crop, params))
            return
        from napari.qt.threading import create_worker

        self._worker = create_worker(self.session.segment, crop, params)
        self._worker.returned.connect(self._finish)
        self._worker.errored.connect(lambda e: setattr(self.status, "value", f"error: {e}"))
        self._worker.finished.connect(self._done)
        self._worker.start()

    def _done(self) -> None:
        self._worker = None
        if self._pending:
            self._pending = False
            self.update_crop()

    def _finish(self, result: CropResult) -> None:
        self.last = result
        scale, origin = self.geometry
        translate = tuple(o + s.start * v for o, s, v in zip(origin, result.crop, scale, strict=True))
        if RESULT_LAYER in self.viewer.layers:
            layer = self.viewer.layers[RESULT_LAYER]
            layer.data, layer.translate, layer.scale = result.labels, translate, scale
        else:
            self.viewer.add_labels(result.labels, name=RESULT_LAYER, scale=scale, translate=translate)
        region = "x".join(str(s.stop - s.start) for s in result.region)
        note = "" if result.exact else "; NOT exact: an object touching the crop is larger than the limit"
        self.status.value = (f"{result.n_instances} instances in the crop, {result.seconds:.2f} s "
                             f"(region {region}{', multicut' if result.multicut else ''}){note}")

    def write_settings(self, _: Any = None) -> Path | None:
        """Write the shown settings into the config (or the "write to" file); returns the written path."""
        from cryosiam_dask.napari.settings_file import write_post_settings

        if self.session is None:
            self.status.value = "choose a config first"
            return None
        out = str(self.out.value or "")
        target = Path(out) if out not in ("", ".") else None
        try:
            path = write_post_settings(self.session.path, self.params(), out=target)
        except CryoSiamDaskError as e:
            self.status.value = str(e)
            return None
        self.status.value = f"settings written to {path}"
        return path
