"""Frames a detector streams to files: StreamResource/StreamDatum documents -> arrays.

ophyd-async detectors (and other current bluesky detectors) do not put a datum id in each event.
They emit a ``stream_resource`` per file and data key (``uri``, ``mimetype``, ``parameters``
such as ``dataset`` and ``chunk_shape``) and a ``stream_datum`` per batch of events, saying that
rows ``indices.start:indices.stop`` of that resource hold the key's values for the events
``seq_nums.start:seq_nums.stop`` of a descriptor. This module reads those rows: one reader class
per mimetype (``STREAM_READERS``; more through ``BlueskyIngestConfig.stream_readers``), the same
seam as the handler registry of Resource/Datum.

``HDF5StreamReader`` (``application/x-hdf5``) opens the file read-only in SWMR mode (the writer
may still be appending) and, when the rows asked for are not there yet, refreshes the dataset
until they are or ``wait_s`` has passed. It returns what exists; the caller counts the rest
(reason ``frames_not_written``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import h5py
import numpy as np


class StreamReadError(Exception):
    """A stream resource that cannot be read at all (no file, no dataset, a bad parameter)."""


class StreamReader(Protocol):
    """Reads rows of one stream resource; built as ``cls(uri, parameters, wait_s=...)``."""

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (axis 0) that exist within the reader's wait; fewer when some never
        came. Raises ``StreamReadError`` when the resource cannot be read."""
        ...

    def close(self) -> None: ...


def path_from_uri(uri: str) -> Path:
    """The local path of a ``file://host/path`` URI (or of a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    raise StreamReadError(f"uri {uri!r}: only file:// URIs are read")


class HDF5StreamReader:
    """Rows of ``parameters["dataset"]`` of an HDF5 file, read while the detector writes it.

    Parameters
    ----------
    uri
        ``file://localhost/path/to/file.h5`` (the stream resource's ``uri``).
    parameters
        The stream resource's ``parameters``: ``dataset`` (path inside the file, required).
    wait_s
        How long one ``read`` waits for rows not yet flushed, seconds.
    poll_s
        Time between two looks at the file while waiting, seconds.
    """

    def __init__(self, uri: str, parameters: Mapping[str, Any], *, wait_s: float = 5.0,
                 poll_s: float = 0.02, clock: Callable[[], float] = time.monotonic) -> None:
        dataset = parameters.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise StreamReadError(f"{uri}: parameters.dataset is missing or not a string")
        self.path = path_from_uri(uri)
        self.dataset_name = dataset
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._clock = clock
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None

    def _open(self) -> h5py.Dataset | None:
        """The dataset, or None while the file or the dataset does not exist yet."""
        if self._dataset is not None:
            return self._dataset
        if not self.path.exists():
            return None
        try:
            self._file = h5py.File(self.path, "r", libver="latest", swmr=True)
        except OSError:  # a writer not in SWMR mode (or an older file format): a plain read
            try:
                self._file = h5py.File(self.path, "r", locking=False)
            except OSError as err:
                raise StreamReadError(f"{self.path}: {err}") from None
        obj = self._file.get(self.dataset_name)
        if obj is None:
            self._close_file()
            return None
        if not isinstance(obj, h5py.Dataset):
            raise StreamReadError(f"{self.path}:{self.dataset_name} is not a dataset")
        self._dataset = obj
        return obj

    def _rows(self) -> int:
        ds = self._dataset
        if ds is None:
            return 0
        if self._file is not None and self._file.swmr_mode:
            ds.refresh()
        return int(ds.shape[0]) if ds.shape else 0

    def read(self, start: int, stop: int) -> np.ndarray:
        deadline = self._clock() + self.wait_s
        while True:
            ds = self._open()
            if ds is not None and self._rows() >= stop:
                break
            if self._clock() >= deadline:
                if ds is None:
                    raise StreamReadError(f"{self.path}:{self.dataset_name} never appeared "
                                          f"within {self.wait_s:g} s")
                break
            time.sleep(self.poll_s)
        assert ds is not None
        try:
            return np.asarray(ds[start:min(stop, self._rows())])
        except (OSError, ValueError, TypeError) as err:
            raise StreamReadError(f"{self.path}:{self.dataset_name}[{start}:{stop}]: {err}") from None

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._dataset = None

    def close(self) -> None:
        self._close_file()


#: mimetype -> reader class, built in.
STREAM_READERS: dict[str, Callable[..., StreamReader]] = {"application/x-hdf5": HDF5StreamReader}


def load_stream_readers(paths: Mapping[str, str]) -> dict[str, Callable[..., StreamReader]]:
    """The reader registry: the built-in ones plus configured ``mimetype -> 'module:Class'``."""
    registry = dict(STREAM_READERS)
    for mimetype, path in paths.items():
        module_name, _, attr = path.partition(":")
        registry[mimetype] = getattr(importlib.import_module(module_name), attr)
    return registry
