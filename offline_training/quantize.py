"""int8 for the CPU: ONNX Runtime static quantisation of the exported graph (``nanoseg export --int8``).

QDQ format, weights int8 per output channel, activations uint8 per tensor, calibrated (min-max)
on synthetic *validation* frames run through the float32 graph, never on a test set. Only the
convolutions and fully connected layers are quantised (``Conv``, ``ConvTranspose``, ``Gemm``):
RoiAlign, NMS, the box decoding and the mask probabilities stay float32. ``keep_float`` names
parts of the network (ONNX node-name fragments such as ``/mask_refiner/``) that stay float32 as
well. The graph's metadata gains ``nanoseg.precision: int8``; ``OnnxEngine`` loads it like the
float32 graph (``--onnx model.int8.onnx``, the daemon's ``model.onnx_path``).

Whether it is worth it is measured, not assumed: BENCHMARKS.md has the frames/s and the mask AP
on the ``paper`` test set beside the float32 graph.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nanoseg.engines.detection_core import INPUT_NAME
from nanoseg.engines.onnx_engine import INT8_REDUCE_RANGE_KEY, PRECISION_KEY

QUANTISED_OPS = ("Conv", "ConvTranspose", "Gemm")


def float_nodes(onnx_bytes: bytes, keep_float: Iterable[str]) -> list[str]:
    """Names of the quantisable nodes whose name contains one of ``keep_float``.

    Parameters
    ----------
    onnx_bytes : bytes
        The float32 graph.
    keep_float : iterable of str
        Node-name fragments (``/mask_refiner/``, ``/mask_head/``, ``/rpn/``, ``/backbone/fpn/``).

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        If a fragment matches no quantisable node (a misspelt part would silently quantise it).
    """
    import onnx

    nodes = [n.name for n in onnx.load_from_string(onnx_bytes).graph.node if n.op_type in QUANTISED_OPS]
    out = []
    for fragment in keep_float:
        hits = [n for n in nodes if fragment in n]
        if not hits:
            raise ValueError(f"keep_float {fragment!r} matches no {'/'.join(QUANTISED_OPS)} node of the graph")
        out += hits
    return sorted(set(out))


class _Frames:
    """ONNX Runtime's CalibrationDataReader protocol over model inputs (1, C, H, W)."""

    def __init__(self, frames: Iterator[np.ndarray]) -> None:
        self.frames = frames

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.frames, None)
        return None if x is None else {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}


def quantize_int8(onnx_bytes: bytes, frames: Iterable[np.ndarray], keep_float: Iterable[str] = (),
                  reduce_range: bool = False) -> bytes:
    """The graph with its convolutions and fully connected layers in int8 (see the module docstring).

    Parameters
    ----------
    onnx_bytes : bytes
        The float32 graph (``nanoseg.export``).
    frames : iterable of ndarray, shape (1, C, H, W) float32
        Calibration model inputs, 0–255 at the model's scale: synthetic validation frames.
    keep_float : iterable of str
        Node-name fragments kept float32 (``float_nodes``).
    reduce_range : bool
        Weights in 7 bits: for x86 CPUs without int8 dot-product instructions (VNNI), whose
        uint8 x int8 products can saturate 16-bit sums (``INT8_REDUCE_RANGE_KEY`` says so).

    Returns
    -------
    bytes
        The QDQ graph, with the float32 graph's metadata and ``nanoseg.precision: int8``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = float_nodes(onnx_bytes, keep_float)
    meta = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
    with tempfile.TemporaryDirectory(prefix="nanoseg_int8_") as tmp:
        src, dst = Path(tmp) / "float32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_static(str(src), str(dst), _Frames(iter(frames)), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
        proto = onnx.load(str(dst))
    del proto.metadata_props[:]
    for key, value in {**meta, PRECISION_KEY: "int8", INT8_REDUCE_RANGE_KEY: str(reduce_range).lower()}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return bytes(proto.SerializeToString())
