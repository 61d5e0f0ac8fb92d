"""The nanoseg checkpoint: weights + the config that builds the model + its input spec.

A checkpoint alone rebuilds the exact model. It is a plain dict of primitives and tensors, so it
loads with ``torch.load(..., weights_only=True)`` (no pickled code)::

    {"format": "nanoseg-checkpoint/1", "model_config": {...}, "input_spec": {...},
     "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from pydantic import ValidationError
from torchvision.models.detection import MaskRCNN

from nanoseg.config_io import ConfigError, format_validation_error
from nanoseg.input_spec import InputSpec
from nanoseg.mask_decoding import MaskDecoding
from nanoseg.model import ModelConfig, build_model
from nanoseg.paths import NotRegularFile, open_regular
from nanoseg.postprocess import OperatingPoint

FORMAT = "nanoseg-checkpoint/1"


class CheckpointError(ConfigError):
    """A checkpoint file is missing, truncated, of the wrong format or does not fit its config.

    A ``ConfigError`` (so a ``ValueError``): the ``nanoseg`` command reports it in one line, exit 2.
    """


@dataclass(frozen=True)
class Checkpoint:
    model_config: ModelConfig
    input_spec: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    stored_half: bool = False
    """The file held float16 weights (``save_checkpoint(..., half=ckpt.stored_half)`` keeps it so)."""

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The thresholds chosen for this model on a validation set, if any (``nanoseg calibrate``)."""
        point = self.meta.get("operating_point")
        if point is None:
            return None
        try:
            return OperatingPoint.model_validate(point)
        except ValueError as err:
            raise CheckpointError(f"malformed operating point in checkpoint meta: {err}") from None

    @property
    def mask_decoding(self) -> MaskDecoding:
        """How this model's masks are predicted (margin, mask TTA): its operating point's, else plain."""
        point = self.operating_point
        return point.mask_decoding if point is not None else MaskDecoding()

    def build(self) -> MaskRCNN:
        """The model with these weights, ready for inference.

        Returns
        -------
        torchvision.models.detection.MaskRCNN
            Built from ``model_config``, in eval mode, on the CPU, float32 weights loaded strictly.

        Raises
        ------
        CheckpointError
            If the weights do not fit the config (a key missing, extra or of another shape).
        """
        model = build_model(self.model_config)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"weights do not fit the model config: {err}") from None
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as the plain dict that is saved (primitives and tensors only).

        Returns
        -------
        dict
            ``format``, ``model_config`` (JSON-able), ``input_spec``, ``state_dict`` and ``meta``.
        """
        return {
            "format": FORMAT,
            "model_config": self.model_config.model_dump(mode="json"),
            "input_spec": dict(self.input_spec),
            "state_dict": self.state_dict,
            "meta": dict(self.meta),
        }


def input_shape(ckpt: Checkpoint) -> tuple[int, int, int]:
    """The model's input shape: one square tile of ``input_spec.size``.

    Parameters
    ----------
    ckpt : Checkpoint
        The model.

    Returns
    -------
    tuple of int
        (channels, height px, width px).
    """
    size = int(ckpt.input_spec.get("size", 512))
    return (ckpt.model_config.in_channels, size, size)


def from_dict(obj: Any, source: str = "<checkpoint>") -> Checkpoint:
    """A checkpoint from the dict ``torch.load`` returned.

    Parameters
    ----------
    obj : Any
        The loaded object; float16 weights are cast to float32 (``stored_half`` records it).
    source : str, optional
        Name of where it came from, for error messages (a file path).

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        If ``obj`` is not a nanoseg checkpoint or a part of it is malformed (a field missing, a
        ``model_config``, ``input_spec`` or ``meta.operating_point`` that does not validate, a
        ``state_dict`` entry that is not a tensor); the message names ``source`` and the field.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a {FORMAT} file")
    missing = [k for k in ("model_config", "input_spec", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{source}: malformed checkpoint: missing {', '.join(missing)}")
    cfg = _validated(ModelConfig, obj["model_config"], source, "model_config")
    spec = obj["input_spec"]
    if not isinstance(spec, dict):
        raise CheckpointError(f"{source}: malformed checkpoint: input_spec is of type {type(spec).__name__}, "
                              "not a mapping")
    _validated(InputSpec, spec, source, "input_spec")
    stored = obj["state_dict"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"{source}: malformed checkpoint: state_dict is of type {type(stored).__name__}, "
                              "not a mapping")
    for key, value in stored.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: malformed checkpoint: state_dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: malformed checkpoint: state_dict[{key!r}] is "
                                  f"of type {type(value).__name__}, not a tensor")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: malformed checkpoint: meta is of type {type(meta).__name__}, not a mapping")
    if meta.get("operating_point") is not None:
        _validated(OperatingPoint, meta["operating_point"], source, "meta.operating_point")
    # Weights may be stored as float16 to halve the file; the model always runs in float32.
    half = any(v.dtype == torch.float16 for v in stored.values())
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in stored.items()}
    return Checkpoint(cfg, dict(spec), state, dict(meta), half)


def _validated(model: type[Any], data: Any, source: str, field_name: str) -> Any:
    """``model.model_validate(data)``; CheckpointError naming ``source`` and the field on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        detail = "; ".join(format_validation_error(err, field_name).splitlines())
        raise CheckpointError(f"{source}: malformed checkpoint: {detail}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: malformed checkpoint: {field_name}: {err}") from None


def without_refiner(ckpt: Checkpoint) -> Checkpoint:
    """The same model without its mask refiner (masks straight from the mask head).

    Parameters
    ----------
    ckpt : Checkpoint

    Returns
    -------
    Checkpoint
        ``ckpt`` itself when it has no refiner; else a copy with the refiner's config and weights
        removed and ``meta`` kept.
    """
    if ckpt.model_config.mask_refiner is None:
        return ckpt
    cfg = ckpt.model_config.model_copy(update={"mask_refiner": None})
    state = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("mask_refiner.")}
    return replace(ckpt, model_config=cfg, state_dict=state)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint file (``torch.load(..., weights_only=True)``: no pickled code runs).

    Parameters
    ----------
    path : str or PathLike
        A ``.pt`` file written by :func:`save_checkpoint`.

    Returns
    -------
    Checkpoint
        Weights in float32 on the CPU.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable or not a nanoseg checkpoint; the message names the file.
    """
    p = Path(path)
    try:
        f = _open_regular(p)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    except OSError as err:
        raise CheckpointError(f"{p}: cannot read checkpoint ({type(err).__name__}: {err.strerror or err})") from None
    try:
        with f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle opcode, ...
        raise CheckpointError(f"{p}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    return from_dict(obj, str(p))


def _open_regular(path: Path) -> BinaryIO:
    """``paths.open_regular``, a non-regular file refused as a CheckpointError naming it."""
    try:
        return open_regular(path)
    except NotRegularFile as err:
        raise CheckpointError(f"{path}: {err.strerror}; refusing to read it") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    CheckpointError
        If ``path`` is not a regular file (a FIFO or device would block for ever; a directory);
        it is refused before it is opened.
    FileNotFoundError, OSError
        If it does not exist or cannot be read.
    """
    h = hashlib.sha256()
    with _open_regular(Path(path)) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str], half: bool = False) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, rename): a crash never leaves half a file.

    Parameters
    ----------
    ckpt : Checkpoint
    path : str or PathLike
        Destination; parent directories are created.
    half : bool, optional
        Store float32 weights as float16 (half the size; loading casts back to float32).

    Returns
    -------
    Path
        ``path``.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    obj = ckpt.to_dict()
    if half:
        obj["state_dict"] = {k: v.half() if v.dtype == torch.float32 else v for k, v in obj["state_dict"].items()}
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p
