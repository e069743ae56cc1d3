"""Running ``instance_predict``: settings (the config's one seam), the four stages, resume, locks, cluster."""
