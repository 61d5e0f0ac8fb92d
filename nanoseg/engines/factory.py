"""Create an engine from a model file: a nanoseg checkpoint (.pt), an ONNX file or a TensorRT plan.

Engine ``triton`` runs remotely, on the server and model a ``TritonTarget`` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from nanoseg.checkpoint import Checkpoint, load_checkpoint
from nanoseg.engines import Engine, EngineError
from nanoseg.engines.triton_engine import TritonTarget
from nanoseg.input_spec import InputSpec

EngineKind = Literal["torch", "onnxruntime", "tensorrt", "triton"]


def input_shape(ckpt: Checkpoint) -> tuple[int, int, int]:
    size = int(ckpt.input_spec.get("size", 512))
    return (ckpt.model_config.in_channels, size, size)


def engine_from_checkpoint(ckpt: Checkpoint, kind: EngineKind, device: str = "cpu", threads: int = 2,
                           onnx_path: str | Path | None = None, cache_dir: Path | None = None,
                           triton: TritonTarget | None = None) -> Engine:
    """An engine of ``kind`` for ``ckpt``. ONNX is exported on the fly when no file is given;
    engine ``triton`` needs ``triton`` (the server must serve this checkpoint's model)."""
    if kind == "torch":
        from nanoseg.engines.torch_engine import TorchEngine

        return TorchEngine(ckpt.build(), input_shape(ckpt), device=device, threads=threads)
    if kind == "triton":
        from nanoseg.engines.triton_engine import TritonEngine

        if triton is None:
            raise EngineError("engine triton needs a server and model name (TritonTarget)")
        remote = TritonEngine(triton.url, triton.model)
        if remote.input_shape != input_shape(ckpt):
            raise EngineError(f"triton: {remote.device} takes {remote.input_shape}, "
                              f"the checkpoint's model {input_shape(ckpt)}")
        return remote
    onnx_bytes = Path(onnx_path).read_bytes() if onnx_path else None
    if onnx_bytes is None:
        from nanoseg.export import checkpoint_metadata, export_onnx_bytes

        onnx_bytes = export_onnx_bytes(
            ckpt.build(), input_shape(ckpt),
            checkpoint_metadata(ckpt.model_config.model_dump(mode="json"), ckpt.input_spec),
        )
    if kind == "onnxruntime":
        from nanoseg.engines.onnx_engine import OnnxEngine

        return OnnxEngine(onnx_bytes, device=device, threads=threads)
    if kind == "tensorrt":
        from nanoseg.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine.from_onnx(onnx_bytes, cache_dir=cache_dir)
    raise EngineError(f"unknown engine {kind!r}: choose torch, onnxruntime, tensorrt or triton")


def load_engine(model_path: str | Path, kind: EngineKind, device: str = "cpu", threads: int = 2,
                onnx_path: str | Path | None = None, cache_dir: Path | None = None,
                triton: TritonTarget | None = None) -> tuple[Engine, Checkpoint]:
    ckpt = load_checkpoint(model_path)
    return engine_from_checkpoint(ckpt, kind, device, threads, onnx_path, cache_dir, triton), ckpt


def input_spec_of(ckpt: Checkpoint) -> InputSpec:
    return InputSpec.model_validate(ckpt.input_spec)
