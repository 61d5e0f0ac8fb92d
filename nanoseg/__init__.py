"""nanoseg: nanowire instance segmentation for X-ray and electron microscopes.

The package is the pure core shared by the daemon (``nanoseg_daemon``, directory ``daemon/``)
and the trainer (``nanoseg_training``, directory ``offline_training/``): arrays in, arrays and
typed results out.
"""

__version__ = "0.1.0"
