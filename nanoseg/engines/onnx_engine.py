"""ONNX Runtime engine: CPU, or the CUDA provider of ``onnxruntime-gpu`` (``pip install 'nanoseg[gpu]'``).

The graph takes 1 to ``max_batch`` images per run (``nanoseg.export``); a larger batch is run in
chunks of ``max_batch``, each chunk in one ``session.run``. A graph quantised to int8
(``nanoseg.quantize``) loads the same way; ``precision`` says which it is.
"""

from __future__ import annotations

import numpy as np

from nanoseg.engines import EngineError, RawDetections, split_outputs
from nanoseg.engines.detection_core import INPUT_NAME, OUTPUT_NAMES
from nanoseg.export import max_batch_of
from nanoseg.mask_decoding import decoding_from_metadata

PRECISION_KEY = "nanoseg.precision"
"""Metadata key of a quantised graph's precision (``int8``); absent: float32."""
INT8_REDUCE_RANGE_KEY = "nanoseg.int8_reduce_range"
"""Metadata key: ``true`` when an int8 graph's weights use 7 bits (``nanoseg export --reduce-range``)."""


def int8_saturation_risk(precision: str, reduce_range: bool, cpu_flags: set[str] | None = None) -> bool:
    """Whether an int8 graph may lose accuracy on this CPU: on x86 without an int8 dot product
    (AVX-512 VNNI or AVX-VNNI) ONNX Runtime multiplies uint8 by int8 weights with VPMADDUBSW,
    whose 16-bit sums saturate (measured: mask AP 86.2 -> 83.9 on the ``paper`` test; 85.9 with
    7-bit weights, which cannot saturate).

    Parameters
    ----------
    precision : str
        The graph's ``PRECISION_KEY`` (``float32`` or ``int8``).
    reduce_range : bool
        Its weights use 7 bits.
    cpu_flags : set of str, optional
        The CPU's feature flags (default: this machine's, from Linux's ``/proc/cpuinfo``).

    Returns
    -------
    bool
        True for a full-range int8 graph on an x86 CPU known to lack VNNI; False otherwise
        (float32, 7-bit weights, VNNI, or flags unknown).
    """
    if precision != "int8" or reduce_range:
        return False
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    x86 = bool(flags & {"sse4_1", "avx2", "avx512f"})
    return x86 and not flags & {"avx512_vnni", "avx_vnni"}


def _cpu_flags() -> set[str]:
    """The first CPU's flags in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, model: bytes | str, device: str = "cpu", threads: int = 2, source: str | None = None) -> None:
        """A session on ``model`` (ONNX bytes or a file path); ``source`` names it in errors
        (default: the path, or ``<graph>`` for bytes).

        Raises
        ------
        EngineError
            If the graph cannot be loaded, its input is not ``image(B, C, H, W)`` with C, H, W
            static, or its metadata (``nanoseg.max_batch``, ``nanoseg.mask_decoding``) is malformed.
        """
        import onnxruntime as ort

        src = source or (model if isinstance(model, str) else "<graph>")

        opts = ort.SessionOptions()
        # ORT sizes its pool from the host's cores and ignores cgroup limits: set it explicitly.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError("onnxruntime: CUDA requested but CUDAExecutionProvider is not available "
                                  "(pip install 'nanoseg[gpu]': onnxruntime-gpu instead of onnxruntime)")
            index = device.partition(":")[2] or "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as err:
            raise EngineError(f"onnxruntime: {src}: cannot load model: {err}") from None
        if device.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise EngineError(f"onnxruntime: the CUDA provider did not load (providers {self.session.get_providers()})")
        inp = self.session.get_inputs()[0]
        if inp.name != INPUT_NAME or len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
            raise EngineError(f"onnxruntime: {src}: expected input {INPUT_NAME}(B,C,H,W), C, H, W static, "
                              f"got {inp.name}{inp.shape}")
        self.input_shape = (int(inp.shape[1]), int(inp.shape[2]), int(inp.shape[3]))
        self.device = device
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.max_batch = max_batch_of(self.metadata, list(inp.shape), src)
            self.mask_decoding = decoding_from_metadata(self.metadata, src)
        except ValueError as err:
            raise EngineError(f"onnxruntime: {err}") from None
        self.precision = self.metadata.get(PRECISION_KEY, "float32")
        self.int8_reduce_range = self.metadata.get(INT8_REDUCE_RANGE_KEY) == "true"

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Run the graph on chunks of up to ``max_batch`` images, one ``session.run`` each.

        See ``Engine.infer``."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out: list[RawDetections] = []
        for i in range(0, len(x), self.max_batch):
            boxes, scores, masks, num = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i: i + self.max_batch]})
            out += split_outputs(boxes, scores, masks, num)
        return out
