"""What a run's start document says about its frames: ``metadata_from_start``.

Start-document metadata (names are canonical; ``metadata_keys`` renames the document keys, see
ingest_config.DEFAULT_METADATA_KEYS; ``a.b`` reads ``doc["a"]["b"]``):

- ``pixel_size_nm`` (positive number) -> FrameMetadata.pixel_size_nm
- ``i0`` (positive number, counts) -> FrameMetadata.i0
- ``dark`` (2-D numeric array) -> FrameMetadata.dark_frame
- ``profile`` (document key ``nanoseg_profile``, a string) -> FrameMetadata.profile
- ``scan_id``, ``sample`` and any other configured name -> FrameMetadata.extra (JSON-safe)
- ``flat_field_key`` (default ``flat_field``; 2-D numeric) -> FrameMetadata.flat_field; a
  descriptor's configuration data or an event's data with that key replaces it for the frames
  that follow (and for the frames of that same event).

A wrong-typed value is reported as a problem (the router counts it as ``bad_metadata``) and
left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanoseg.codec import json_safe
from nanoseg_daemon.contracts import FrameMetadata


def _lookup(doc: Mapping[str, Any], dotted: str) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _positive_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    f = float(value)
    return f if math.isfinite(f) and f > 0 else None


def image_array(value: Any) -> np.ndarray | None:
    """A 2-D numeric array (a dark or flat-field frame) from an array-like (squeezing one leading axis of length 1)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        return None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.dtype.kind not in "biuf" or arr.size == 0:
        return None
    return arr


def metadata_from_start(
    doc: Mapping[str, Any], keys: dict[str, str], flat_field_key: str
) -> tuple[FrameMetadata, list[str]]:
    """FrameMetadata from a start document, and the problems found (one line each).

    ``keys``: canonical name -> document key (dotted for nested), e.g. the resolved
    ``BlueskyIngestConfig.metadata_keys``.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, key in keys.items():
        raw = _lookup(doc, key)
        if raw is None:
            continue
        if name in ("pixel_size_nm", "i0"):
            num = _positive_number(raw)
            if num is None:
                problems.append(f"start[{key!r}] for {name}: not a positive number: {raw!r:.80}")
            else:
                values[name] = num
        elif name == "dark":
            arr = image_array(raw)
            if arr is None:
                problems.append(f"start[{key!r}] for dark: not a 2-D numeric array")
            else:
                values["dark_frame"] = arr
        elif name == "profile":
            if isinstance(raw, str) and raw:
                values["profile"] = raw
            else:
                problems.append(f"start[{key!r}] for profile: not a string: {raw!r:.80}")
        else:
            extra[name] = json_safe(raw, max_array_size=1024)
    flat = doc.get(flat_field_key)
    if flat is not None:
        arr = image_array(flat)
        if arr is None:
            problems.append(f"start[{flat_field_key!r}]: not a 2-D numeric array")
        else:
            values["flat_field"] = arr
    return FrameMetadata(extra=extra, **values), problems
