"""ONNX Runtime engine (CPU, or the CUDA provider when present)."""

from __future__ import annotations

import numpy as np

from nanoseg.engines import EngineError, RawDetections, split_outputs
from nanoseg.engines.detection_core import INPUT_NAME, OUTPUT_NAMES
from nanoseg.mask_decoding import decoding_from_metadata


class OnnxEngine:
    name = "onnxruntime"
    max_batch = 1  # exported with batch 1 (batch > 1 exports of Mask R-CNN are unreliable)

    def __init__(self, model: bytes | str, device: str = "cpu", threads: int = 2) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # ORT sizes its pool from the host's cores and ignores cgroup limits: set it explicitly.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError("onnxruntime: CUDA requested but CUDAExecutionProvider is not available")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as err:
            raise EngineError(f"onnxruntime: cannot load model: {err}") from None
        inp = self.session.get_inputs()[0]
        if inp.name != INPUT_NAME or len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape):
            raise EngineError(f"onnxruntime: expected static input {INPUT_NAME}(1,C,H,W), got {inp.name}{inp.shape}")
        self.input_shape = (int(inp.shape[1]), int(inp.shape[2]), int(inp.shape[3]))
        self.device = device
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.mask_decoding = decoding_from_metadata(self.metadata)

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Run the ONNX graph once per image (it is batch-1 static). See ``Engine.infer``."""
        out: list[RawDetections] = []
        for image in np.ascontiguousarray(batch, dtype=np.float32):
            boxes, scores, masks, num = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: image[None]})
            out += split_outputs(boxes, scores, masks, num)
        return out
