"""The run widget: ``instance_predict`` for a config on a dask client, with its dashboard link and progress.

The run goes in a worker thread: the client is the config's cluster (``cryosiam_dask`` settings, as the CLI
starts it) or an existing scheduler's; each tomogram's labels are added to the viewer as soon as its outputs
are written (the driver's ``on_done``), and the log's lines of the run are shown below the progress bar.
"""

import logging
import queue
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import CheckBox, Container, FileEdit, Label, LineEdit, ProgressBar, PushButton, TextEdit

from cryosiam_dask.errors import CryoSiamDaskError
from cryosiam_dask.run.stages import TomogramResult

__all__ = ["RunWidget"]

#: output kinds, in the order tried for the layer of a finished tomogram
RESULT_OUTPUTS = ("instances_h5", "ome_zarr", "mrc")


class _Lines(logging.Handler):
    """Forwards the run's INFO lines to a callback (called from the run's threads; it only queues)."""

    def __init__(self, emit: Any) -> None:
        super().__init__(logging.INFO)
        self._emit = emit
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self._emit(self.format(record))


class RunWidget(Container):
    """Config, scheduler, "Run", dashboard link, per-tomogram progress, each result loaded when written.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Where each tomogram's instances are added.
    processes : bool, default True
        A local cluster's workers are processes (True) or threads of napari's process (False, for tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer, processes: bool = True) -> None:
        super().__init__(labels=True)
        self.viewer, self.processes = viewer, processes
        self.results: list[TomogramResult] = []
        self.error: str | None = None
        self.running = False
        self._worker: Any = None
        # the run's threads (the driver's, dask's) only put here; the main thread drains it on a timer, so no
        # Qt object is touched outside the main thread
        self._events: queue.Queue = queue.Queue()
        self._timer: Any = None
        self.config = FileEdit(label="config", mode="r", filter="*.yaml *.yml")
        self.scheduler = LineEdit(label="scheduler address", value="")
        self.load_results = CheckBox(text="load each result when written", value=True)
        self.run_button = PushButton(text="Run instance_predict")
        self.dashboard = Label(label="dashboard", value="")
        self.progress = ProgressBar(label="tomograms", value=0, min=0, max=1)
        self.log = TextEdit(label="log", value="")
        self.log.native.setReadOnly(True)
        self.extend([self.config, self.scheduler, self.load_results, self.run_button, self.dashboard,
                     self.progress, self.log])
        self.run_button.changed.connect(self.start)

    def start(self, _: Any = None) -> None:
        """Validate the config and start the run in a worker thread."""
        from napari.qt.threading import create_worker
        from qtpy.QtCore import QTimer

        from cryosiam_dask.config import load_config

        if self.running:
            return
        try:
            overrides = {"scheduler_address": self.scheduler.value.strip() or None}
            config = load_config(Path(self.config.value), overrides)
            n = len(config.input_files())
        except CryoSiamDaskError as e:
            self.log.value = str(e)
            return
        self.results, self.error, self.running = [], None, True
        self.progress.max, self.progress.value, self.log.value = n, 0, ""
        self.run_button.enabled = False
        self._events = queue.Queue()
        self._on_done = lambda result: self._events.put((self._done_one, result))
        self._on_line = lambda line: self._events.put((self._line, line))
        self._on_link = lambda link: self._events.put((self._link, link))
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._drain)
        self._timer.start()
        self._worker = create_worker(self._run, config)
        self._worker.errored.connect(self._failed)
        self._worker.finished.connect(self._finished)
        self._worker.start()

    def _run(self, config: Any) -> list[TomogramResult]:
        """In the worker thread: the client, then ``instance_predict`` with a callback per tomogram."""
        from cryosiam_dask.run.cluster import resolve_device, start_client
        from cryosiam_dask.run.driver import cluster_plan, instance_predict
        from cryosiam_dask.run.settings import RunSettings

        s = config.cryosiam_dask
        # the run's own cluster settings (scheduler_file included), started here to show the dashboard first
        plan = cluster_plan(RunSettings.from_config(config, device=resolve_device(s.device)).cluster)
        handler = _Lines(self._on_line)
        logger = logging.getLogger("cryosiam_dask")
        logger.addHandler(handler)
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            with start_client(plan, processes=self.processes) as client:
                self._on_link(client.dashboard_link if s.dashboard_address else "")
                return instance_predict(config, client=client, on_done=self._on_done)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    def _drain(self) -> None:
        """On the main thread: apply what the run's threads queued, in order."""
        while True:
            try:
                apply, value = self._events.get_nowait()
            except queue.Empty:
                return
            apply(value)

    def _link(self, link: str) -> None:
        self.dashboard.value = link or "(dashboard off: cryosiam_dask.dashboard_address is null)"

    def _line(self, line: str) -> None:
        self.log.value = f"{self.log.value}\n{line}" if self.log.value else line

    def _done_one(self, result: TomogramResult) -> None:
        """On the main thread: count it and add its labels layer."""
        self.results.append(result)
        self.progress.value = len(self.results)
        if not self.load_results.value:
            return
        from cryosiam_dask.napari.reader import read_output

        for kind in RESULT_OUTPUTS:
            if kind in result.outputs:
                for data, kwargs, layer_type in read_output(result.outputs[kind]):
                    if layer_type == "labels":
                        kwargs["name"] = f"{result.stem} instances"
                        if kwargs["name"] in self.viewer.layers:
                            self.viewer.layers.remove(kwargs["name"])
                        self.viewer.add_labels(data, **kwargs)
                break

    def _failed(self, e: BaseException) -> None:
        self._drain()
        self.error = " ".join(str(e).splitlines()) or type(e).__name__
        self._line(f"error: {self.error}")

    def _finished(self) -> None:
        self._drain()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.running, self._worker = False, None
        self.run_button.enabled = True
        n = self.progress.max
        self._line(f"finished: {len(self.results)} of {n} tomogram(s) written")
