"""Export a checkpoint's network to ONNX: static input shape, batch 1, standard ops.

TorchScript-based exporter (``dynamo=False``: the dynamo exporter still fails on torchvision
detection models), opset 17, batch 1 and a fixed H x W so no scale factor is frozen at trace
size; the graph ends at the M x M mask probabilities (``DetectionCore``), padded to K outputs.
The model's metadata (model config, input spec, mask decoding) is written into the ONNX file's
metadata_props; the mask decoding (margin, mask TTA) is part of the graph, and mask pasting must
use the same one (``nanoseg.mask_decoding.decoding_from_metadata`` reads it back).
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from nanoseg.checkpoint import Checkpoint, input_shape
from nanoseg.engines.detection_core import INPUT_NAME, OUTPUT_NAMES, DetectionCore
from nanoseg.mask_decoding import METADATA_KEY, MaskDecoding
from nanoseg.model import ModelConfig

OPSET = 17


def trace_image(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A deterministic wire-like test pattern (bright bars on dark ground), (1, C, H, W) 0–255.

    Tracing with an image that yields detections exercises the whole graph (an empty trace image
    has produced broken exports elsewhere).
    """
    c, h, w = shape
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    for _ in range(8):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 120)
        if rng.uniform() < 0.5:
            img[y: y + 16, x: x + 110] += 120
        else:
            img[max(y - 90, 0): y + 20, x: x + 16] += 120
    img = np.clip(img, 0, 255)
    return torch.from_numpy(np.repeat(img[None], c, axis=0))[None]


def export_onnx_bytes(model: MaskRCNN, input_shape: tuple[int, int, int], metadata: dict[str, str] | None = None,
                      decoding: MaskDecoding | None = None, model_config: ModelConfig | None = None) -> bytes:
    """ONNX model bytes for ``model`` at input (1, C, H, W) = (1, *input_shape), its masks
    predicted with ``decoding`` (``model_config``: the model's pixel convention, see
    ``DetectionCore``)."""
    import onnx

    core = DetectionCore(model.eval(), decoding, model_config)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            core, (trace_image(input_shape),), buf,  # type: ignore[arg-type]  # file objects work
            dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    _set_static_output_shapes(proto, core.k, core.m)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _set_static_output_shapes(proto: object, k: int, m: int) -> None:
    """Declare the outputs' shapes: batch 1 and exactly K detections (DetectionCore pads to K).

    The tracer cannot prove the padded length is K, so it leaves a symbolic dimension; TensorRT
    and Triton need the static shape that the graph guarantees.
    """
    shapes = {"boxes": (1, k, 4), "scores": (1, k), "mask_probs": (1, k, m, m), "num_detections": (1,)}
    for out in proto.graph.output:  # type: ignore[attr-defined]
        dims = out.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[out.name]):
            dim.Clear()
            dim.dim_value = value


def export_checkpoint_onnx(ckpt: Checkpoint, decoding: MaskDecoding | None = None, version: str = "") -> bytes:
    """ONNX bytes of a checkpoint's network, with its metadata; masks predicted with ``decoding``
    (default: the checkpoint's own, ``Checkpoint.mask_decoding``)."""
    decoding = decoding or ckpt.mask_decoding
    meta = {"nanoseg.model_config": json.dumps(ckpt.model_config.model_dump(mode="json"), sort_keys=True),
            "nanoseg.input_spec": json.dumps(dict(ckpt.input_spec), sort_keys=True),
            METADATA_KEY: decoding.model_dump_json(),
            "nanoseg.version": version}
    return export_onnx_bytes(ckpt.build(), input_shape(ckpt), meta, decoding, ckpt.model_config)


def read_onnx_metadata(onnx_bytes: bytes) -> dict[str, str]:
    """An ONNX file's metadata_props as a dict."""
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}

