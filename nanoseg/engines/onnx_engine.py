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


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, model: bytes | str, device: str = "cpu", threads: int = 2) -> None:
        import onnxruntime as ort

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
            raise EngineError(f"onnxruntime: cannot load model: {err}") from None
        if device.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise EngineError(f"onnxruntime: the CUDA provider did not load (providers {self.session.get_providers()})")
        inp = self.session.get_inputs()[0]
        if inp.name != INPUT_NAME or len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
            raise EngineError(f"onnxruntime: expected input {INPUT_NAME}(B,C,H,W), C, H, W static, got {inp.name}{inp.shape}")
        self.input_shape = (int(inp.shape[1]), int(inp.shape[2]), int(inp.shape[3]))
        self.device = device
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.max_batch = max_batch_of(self.metadata, list(inp.shape))
        except ValueError as err:
            raise EngineError(f"onnxruntime: {err}") from None
        self.precision = self.metadata.get(PRECISION_KEY, "float32")
        self.mask_decoding = decoding_from_metadata(self.metadata)

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Run the graph on chunks of up to ``max_batch`` images, one ``session.run`` each.

        See ``Engine.infer``."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out: list[RawDetections] = []
        for i in range(0, len(x), self.max_batch):
            boxes, scores, masks, num = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i: i + self.max_batch]})
            out += split_outputs(boxes, scores, masks, num)
        return out
