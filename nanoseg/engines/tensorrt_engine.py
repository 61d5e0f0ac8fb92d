"""TensorRT engine: FP16 plan built from the exported ONNX with the TensorRT Python API.

Written against TensorRT 10's name-based tensor API (``num_io_tensors``, ``set_tensor_address``,
``execute_async_v3``, ``set_input_shape``, ``get_tensor_profile_shape``). The graph's batch
dimension becomes one optimisation profile (1 to ``max_batch`` images, tuned for
``max_batch``); buffers hold the largest batch. Buffers are torch CUDA tensors, so no pycuda is
needed. Built plans are
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
from nanoseg.export import max_batch_of, read_onnx_metadata
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
    """Parse the ONNX graph and build a serialised TensorRT engine.

    The graph's batch dimension (``nanoseg.export``: 1 to ``max_batch`` images) gets one
    optimisation profile, min 1, opt and max ``max_batch``; a graph exported before it had one
    (static (1, C, H, W)) gets a static profile.

    Parameters
    ----------
    onnx_bytes : bytes
        The exported ONNX graph.
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
    lo, hi = batch_profile(list(inp.shape), max_batch_of(read_onnx_metadata(onnx_bytes), list(inp.shape)))
    profile.set_shape(inp.name, lo, hi, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("tensorrt: engine build failed (see the TensorRT log above)")
    return bytes(plan)


def batch_profile(dims: list[int], max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The smallest and largest input shape of the optimisation profile: batch 1 and ``max_batch``.

    Parameters
    ----------
    dims : list of int
        The network input's dimensions, -1 where dynamic (only the batch may be).
    max_batch : int
        The graph's ``max_batch``.

    Returns
    -------
    (min shape, max shape)

    Raises
    ------
    EngineError
        If a dimension other than the batch is dynamic.
    """
    if len(dims) != 4 or any(d < 1 for d in dims[1:]):
        raise EngineError(f"tensorrt: input must be (B, C, H, W) with C, H, W static, got {tuple(dims)}")
    if dims[0] >= 1:  # a static batch: exactly that
        return tuple(dims), tuple(dims)
    return (1, *dims[1:]), (max_batch, *dims[1:])


class TensorRTEngine:
    name = "tensorrt"
    mask_decoding = MaskDecoding()
    """Set by ``engine_from_checkpoint`` to the decoding of the graph it built or verified."""

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
        # Buffers of the profile's largest batch; a smaller batch uses their leading rows.
        _, _, largest = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch = int(largest[0])
        self.context.set_input_shape(INPUT_NAME, tuple(largest))
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            tdtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
            self.buffers[name] = torch.empty(shape, dtype=tdtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        _, c, h, w = self.buffers[INPUT_NAME].shape
        self.input_shape = (int(c), int(h), int(w))
        self._lo_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[0][0])

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
        """Run the plan on chunks of up to ``max_batch`` images on the engine's CUDA stream.

        See ``Engine.infer``.

        ``EngineError`` if TensorRT's execution fails.
        """
        torch = self._torch
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out: list[RawDetections] = []
        for i in range(0, len(x), self.max_batch):
            chunk = x[i: i + self.max_batch]
            b = len(chunk)
            if b < self._lo_batch:  # a static-batch plan: fill it with the chunk's last image
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self._lo_batch - b, axis=0)])
            with torch.cuda.stream(self.stream):
                self.context.set_input_shape(INPUT_NAME, chunk.shape)
                self.buffers[INPUT_NAME][: len(chunk)].copy_(torch.from_numpy(chunk), non_blocking=False)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise EngineError("tensorrt: execute_async_v3 failed")
            self.stream.synchronize()
            # Outputs lead with the batch, so a batch of b fills the first b rows of each buffer.
            host = [self.buffers[n][:b].cpu().numpy() for n in OUTPUT_NAMES]
            out += split_outputs(*host)
        return out
