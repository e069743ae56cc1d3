"""CryoSiam's instance YAML (unchanged) plus our optional ``cryosiam_dask:`` section, validated strictly.

:func:`load_config` reads a file into an :class:`InstanceConfig`; :mod:`cryosiam_dask.run.settings` turns that
into the frozen settings each stage takes (the one place the config enters the pipeline).
"""

from cryosiam_dask.config.load import load_config
from cryosiam_dask.config.schema import IGNORED_KEYS, DaskSettings, InstanceConfig

__all__ = ["IGNORED_KEYS", "DaskSettings", "InstanceConfig", "load_config"]
