"""Offline side of nanoseg: synthetic data, training, evaluation, export (imported as ``nanoseg_training``)."""
