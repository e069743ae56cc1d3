"""Fault injection for the reliability tests, loaded by every Python process of a test run.

A test puts this folder on ``PYTHONPATH`` and sets ``CRYOSIAM_DASK_TEST_DIE_AFTER="<stage>:<n>"``; the CLI and
each dask worker it spawns import this module at start-up, and the process group is SIGKILLed once ``n``
chunks of that stage (``maps``, ``windows``, ``instances``) have their done marker, or once ``n`` output files
(``outputs``) are written: a killed run at an exact, timing-independent moment. Nothing in the package knows.
"""

import os

DIE_AFTER_ENV = "CRYOSIAM_DASK_TEST_DIE_AFTER"
_SPEC = os.environ.get(DIE_AFTER_ENV)


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
