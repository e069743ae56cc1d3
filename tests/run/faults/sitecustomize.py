"""Fault injection for the reliability tests, loaded by every Python process of a test run.

A test puts this folder on ``PYTHONPATH`` and sets one of two variables; the CLI and each dask worker it
spawns import this module at start-up. Nothing in the package knows.

``CRYOSIAM_DASK_TEST_DIE_AFTER="<stage>:<n>"``: the process group is SIGKILLed once ``n`` chunks of that stage
(``maps``, ``windows``, ``instances``) have their done marker, or once ``n`` output files (``outputs``) are
written: a killed run at an exact, timing-independent moment.

``CRYOSIAM_DASK_TEST_FAULT="<kind>[:<arg>]"``, in the dask worker processes only:

- ``worker-dies:<stage>``: every task of that stage SIGKILLs its own worker (as the OS out-of-memory killer);
- ``task-raises:<stage>``: every task of that stage raises ``RuntimeError``;
- ``worker-import:<module>``: importing ``<module>`` fails with ``ImportError`` (a broken install);
- ``worker-start``: the worker process exits with status 3 as it starts.
"""

import os
import sys

DIE_AFTER_ENV = "CRYOSIAM_DASK_TEST_DIE_AFTER"
FAULT_ENV = "CRYOSIAM_DASK_TEST_FAULT"
_SPEC = os.environ.get(DIE_AFTER_ENV)
_FAULT = os.environ.get(FAULT_ENV)
_IN_WORKER = "--multiprocessing-fork" in sys.argv  # distributed's nannies spawn their workers


def _die() -> None:
    import signal

    os.killpg(os.getpgid(0), signal.SIGKILL)


if _SPEC:
    _stage, _, _n = _SPEC.partition(":")
    _limit = int(_n)
    if _stage == "outputs":
        from cryosiam_dask.run import write as _write

        _real_put = _write._put
        _written = [0]

        def _put(*args, **kwargs):
            _real_put(*args, **kwargs)
            _written[0] += 1
            if _written[0] >= _limit:
                _die()

        _write._put = _put
    else:
        from cryosiam_dask.run import resume as _resume

        _real_save = _resume.ChunkMarkers.save

        def _save(self, index, **arrays):
            _real_save(self, index, **arrays)
            if self.stage == _stage and self.count() >= _limit:
                _die()

        _resume.ChunkMarkers.save = _save

if _FAULT and _IN_WORKER:
    _kind, _, _arg = _FAULT.partition(":")
    if _kind == "worker-start":
        os._exit(3)
    elif _kind == "worker-import":

        class _BrokenImport:
            def find_spec(self, name, path=None, target=None):
                if name == _arg:
                    raise ImportError(f"libbroken.so: cannot open shared object file (injected, {name})")
                return None

        sys.meta_path.insert(0, _BrokenImport())
    elif _kind in ("worker-dies", "task-raises"):
        from cryosiam_dask.run import resume as _resume

        _real_save = _resume.ChunkMarkers.save

        def _faulty_save(self, index, **arrays):
            if self.stage == _arg:
                if _kind == "worker-dies":
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault in a {_arg} task")
            _real_save(self, index, **arrays)

        _resume.ChunkMarkers.save = _faulty_save
