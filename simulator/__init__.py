"""A simulated microscope for nanoseg: a bluesky RunEngine with ophyd devices imaging synthetic
nanowires in transmission (``nanoseg simulate``), and the one-command demo (``nanoseg demo``)."""
