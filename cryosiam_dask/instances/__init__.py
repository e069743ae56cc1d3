"""Instances from the maps: CryoSiam's post-processing per block, the chunked merge with global ids, and the
whole-volume reference (:func:`~cryosiam_dask.instances.reference.instance_segmentation`)."""
