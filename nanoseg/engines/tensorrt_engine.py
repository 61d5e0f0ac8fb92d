"""TensorRT engine: FP16 plan built from the exported ONNX with the TensorRT Python API.

Written against TensorRT 10's name-based tensor API (``num_io_tensors``, ``set_tensor_address``,
``execute_async_v3``). Buffers are torch CUDA tensors, so no pycuda is needed. Built plans are
cached in ``cache_dir`` under a key of the GPU model, the TensorRT version and the ONNX's
sha256, so a daemon restart on the same host deserialises instead of rebuilding (minutes).

``tensorrt`` cannot be installed on the CPU-only development machines; importing this module
works without it, creating an engine raises ``EngineError`` saying why.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from nanoseg.engines import EngineError, RawDetections, split_outputs
from nanoseg.engines.detection_core import INPUT_NAME, OUTPUT_NAMES
from nanoseg.mask_decoding import MaskDecoding

DEFAULT_WORKSPACE_BYTES = 2 << 30


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise EngineError(f"tensorrt: the tensorrt Python package is not installed ({err})") from None
    return trt


def _require_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise EngineError("tensorrt: no CUDA device available")
    return torch


def plan_cache_key(onnx_bytes: bytes, fp16: bool) -> str:
    """File name stem of a cached plan: plans are valid for one GPU model and TensorRT version.

    Parameters
    ----------
    onnx_bytes : bytes
        The exported ONNX graph.
    fp16 : bool
        Whether the plan allows float16 kernels.

    Returns
    -------
    str
        ``<gpu name>-trt<version>-<fp16|fp32>-<first 16 hex digits of the ONNX's sha256>``.

    Raises
    ------
    EngineError
        If TensorRT or CUDA is not available.
    """
    trt = _import_tensorrt()
    torch = _require_cuda()
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    digest = hashlib.sha256(onnx_bytes).hexdigest()[:16]
    return f"{gpu}-trt{trt.__version__}-{'fp16' if fp16 else 'fp32'}-{digest}"


def build_plan(onnx_bytes: bytes, fp16: bool = True, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> bytes:
    """Parse the ONNX graph and build a serialised TensorRT engine (one static optimisation profile).

    Parameters
    ----------
    onnx_bytes : bytes
        The exported ONNX graph (batch-1 static input).
    fp16 : bool, optional
        Allow float16 kernels.
    workspace_bytes : int, optional
        Builder workspace memory limit in bytes.

    Returns
    -------
    bytes
        The serialised plan.

    Raises
    ------
    EngineError
        If the graph cannot be parsed or the build fails.
    """
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"tensorrt: cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if any(d < 0 for d in shape):
        raise EngineError(f"tensorrt: input {inp.name} must have a static shape, got {shape}")
    profile.set_shape(inp.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("tensorrt: engine build failed (see the TensorRT log above)")
    return bytes(plan)


class TensorRTEngine:
    name = "tensorrt"
    mask_decoding = MaskDecoding()
    """Set by ``engine_from_checkpoint`` to the decoding of the graph it built or verified."""
    max_batch = 1

    def __init__(self, plan: bytes) -> None:
        trt = _import_tensorrt()
        torch = _require_cuda()
        self._torch = torch
        self.device = f"cuda:{torch.cuda.current_device()}"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError("tensorrt: cannot deserialise the engine plan (version or GPU mismatch?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, Any] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = {INPUT_NAME, *OUTPUT_NAMES} - set(names)
        if missing:
            raise EngineError(f"tensorrt: engine lacks tensors {sorted(missing)}")
        for name in names:
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            tdtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
            self.buffers[name] = torch.empty(shape, dtype=tdtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        _, c, h, w = self.buffers[INPUT_NAME].shape
        self.input_shape = (int(c), int(h), int(w))

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, cache_dir: Path | None = None, fp16: bool = True,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> TensorRTEngine:
        """An engine from an ONNX graph: the cached plan for this GPU and TensorRT version, else a new one.

        Parameters
        ----------
        onnx_bytes, fp16, workspace_bytes
            As :func:`build_plan`.
        cache_dir : Path, optional
            Directory of cached plans (:func:`plan_cache_key` names them); None builds without caching.

        Returns
        -------
        TensorRTEngine
        """
        if cache_dir is None:
            return cls(build_plan(onnx_bytes, fp16, workspace_bytes))
        path = Path(cache_dir) / f"{plan_cache_key(onnx_bytes, fp16)}.plan"
        if path.exists():
            return cls(path.read_bytes())
        plan = build_plan(onnx_bytes, fp16, workspace_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, path)
        return cls(plan)

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Run the plan once per image on the engine's CUDA stream. See ``Engine.infer``.

        ``EngineError`` if TensorRT's execution fails.
        """
        torch = self._torch
        out: list[RawDetections] = []
        for image in np.ascontiguousarray(batch, dtype=np.float32):
            with torch.cuda.stream(self.stream):
                self.buffers[INPUT_NAME].copy_(torch.from_numpy(image[None]), non_blocking=False)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise EngineError("tensorrt: execute_async_v3 failed")
            self.stream.synchronize()
            host = [self.buffers[n].cpu().numpy() for n in OUTPUT_NAMES]
            out += split_outputs(*host)
        return out
