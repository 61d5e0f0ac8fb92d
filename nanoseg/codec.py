"""The one wire codec: JSON-safe values, and msgpack with NumPy arrays (encode, and a decode that
never unpickles).

Every layer that puts documents on a wire or into a file uses these: the daemon's publisher,
ingest and store, the simulator's publisher and the demo's listener. NumPy arrays travel as
``msgpack_numpy`` encodes them; the decoder refuses object arrays, which ``msgpack_numpy`` would
decode with ``pickle.loads`` (running the sender's code).
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import orjson


class CodecError(ValueError):
    """Bytes that do not decode safely (an object array, a broken NumPy buffer)."""


_PLAIN = frozenset({str, int, bool, type(None)})


def json_safe(obj: Any, max_array_size: int | None = None) -> Any:
    """A copy of ``obj`` that ``json.dumps`` writes as standard JSON.

    Parameters
    ----------
    obj
        Nested dicts, lists, tuples, NumPy arrays and scalars, and plain Python values.
    max_array_size
        Arrays with more elements become the string ``"<array SHAPE DTYPE>"`` (None: no limit).

    Returns
    -------
    Any
        NumPy values as Python values, non-finite floats as None, tuples as lists, dict keys as
        strings, and any other object as its ``str``.
    """
    t = type(obj)  # the common exact types first: this runs per value of every stored result
    if t is float:
        return obj if math.isfinite(obj) else None
    if t is str or t is int or t is bool or obj is None:
        return obj
    if t is list and all(type(v) in _PLAIN for v in obj):
        return list(obj)
    if isinstance(obj, np.ndarray) and max_array_size is not None and obj.size > max_array_size:
        return f"<array {obj.shape} {obj.dtype}>"
    if isinstance(obj, np.ndarray | np.generic):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v, max_array_size) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, max_array_size) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


_ORJSON_OPTIONS = (orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
                   | orjson.OPT_PASSTHROUGH_SUBCLASS)


def _orjson_default(obj: Any) -> Any:
    """What orjson does not write itself, as ``json_safe`` would have it."""
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    for plain in (bool, int, float, str):
        if isinstance(obj, plain):
            return plain(obj)
    if isinstance(obj, dict):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return list(obj)
    return str(obj)


def json_text(obj: Any, numpy: bool = False) -> str:
    """Compact strict JSON of ``obj``: the values of
    ``json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":"))``, written by orjson
    (about 20x faster on a frame summary; numbers may be spelled differently, e.g. ``1e16`` for
    ``1e+16``).

    Parameters
    ----------
    obj
        As ``json_safe`` takes.
    numpy
        Write NumPy arrays in orjson itself rather than through a Python list each (a particle
        table's 40 columns: several times faster). The same values for float64, integer and bool
        arrays; a float32 array would be written as float32 values (``0.1`` where ``json_safe``
        gives ``0.10000000149011612``), so pass those as float64.

    Returns
    -------
    str
        JSON text; non-finite floats as null, NumPy values as Python values, dict keys as strings.
    """
    try:
        options = _ORJSON_OPTIONS | orjson.OPT_SERIALIZE_NUMPY if numpy else _ORJSON_OPTIONS
        return orjson.dumps(obj, default=_orjson_default, option=options).decode()
    except (orjson.JSONEncodeError, TypeError):  # e.g. an integer beyond 64 bits
        return json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":"))


MSGPACK_INT_MIN, MSGPACK_INT_MAX = -(2**63), 2**64 - 1
"""The integers msgpack can carry (int64 and uint64); beyond them ``msgpack_dumps`` fails."""


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (msgpack, JSON, SQLite), or None.

    Parameters
    ----------
    text : str
        E.g. a string from a JSON ``\\ud800`` escape, which Python holds as a lone surrogate.

    Returns
    -------
    str or None
        ``"text with a lone surrogate '\\ud800' (not encodable as UTF-8)"``, None when it encodes.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"text with a lone surrogate {text[err.start]!r} (not encodable as UTF-8)"
    return None


def msgpack_dumps(doc: Any) -> bytes:
    """msgpack bytes of ``doc``, NumPy arrays as ``msgpack_numpy.encode`` writes them."""
    return bytes(msgpack.packb(doc, default=msgpack_numpy.encode))


def _numpy_object_hook(obj: dict[Any, Any]) -> Any:
    """msgpack_numpy's decode, minus its one unsafe branch (object arrays are unpickled there)."""
    if b"nd" not in obj:
        return msgpack_numpy.decode(obj)  # complex numbers, or the map unchanged
    if obj.get(b"kind") == b"O":
        raise CodecError("msgpack object array (would need unpickling)")
    try:
        value = msgpack_numpy.decode(obj)
    except (TypeError, ValueError) as err:
        raise CodecError(f"bad msgpack_numpy array: {err}") from None
    if isinstance(value, np.ndarray | np.generic) and value.dtype.hasobject:
        raise CodecError("msgpack array with an object dtype")
    return value


def msgpack_loads(payload: bytes) -> Any:
    """Decode msgpack with NumPy arrays as ``msgpack_numpy`` encodes them; never unpickles.

    Raises
    ------
    CodecError
        An object array or a broken NumPy buffer (other malformed bytes raise msgpack's errors).
    """
    return msgpack.unpackb(payload, raw=False, object_hook=_numpy_object_hook)
