"""The live segmentation service (imported as ``nanoseg_daemon``)."""
