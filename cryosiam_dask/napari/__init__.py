"""napari plugin (npe2, the ``napari`` extra): a reader for our outputs, the crop tuning and run widgets.

Nothing here is imported by ``import cryosiam_dask`` or the CLI; napari loads these modules through the
manifest ``napari.yaml`` (entry point ``napari.manifest``). :mod:`~cryosiam_dask.napari.reader` and
:mod:`~cryosiam_dask.napari.session` import no Qt; the widgets need napari, magicgui and a Qt binding.
"""
