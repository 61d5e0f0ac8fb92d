"""Export a checkpoint's network to ONNX: a batch of 1 to ``max_batch`` inputs, static C x H x W, standard ops.

TorchScript-based exporter (``dynamo=False``: the dynamo exporter still fails on torchvision
detection models), opset 17, a fixed C x H x W so no scale factor is frozen at trace size; the
graph ends at the M x M mask probabilities (``DetectionCore``), padded to K outputs.

The batch dimension (``batch``) is dynamic in the graph's interface, 1 to ``max_batch`` images,
but the computation is that of ``max_batch`` images: the tracer unrolls torchvision's per-image
loops (proposal selection, box post-processing) for the images it traced with, so a graph
traced at 2 cannot run 3 (pytorch/vision #2309). ``PaddedBatch`` therefore repeats the last
image up to ``max_batch`` inside the graph and cuts the outputs back to the images given. A
batch of fewer images costs as much as a full one: export ``max_batch`` 1 for a CPU daemon that
runs frame by frame, more for a GPU or Triton's dynamic batcher, which fill their batches.
``nanoseg.max_batch`` in the metadata says the graph's ``max_batch``; a larger batch must be
split by the caller (``max_batch_of`` reads it).
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
BATCH_DIM = "batch"
MAX_BATCH_KEY = "nanoseg.max_batch"


class PaddedBatch(torch.nn.Module):
    """``core`` on a batch of 1 to ``max_batch`` images, computed at ``max_batch`` (see the module
    docstring): the last image fills the batch (a Gather), the outputs are cut back (a Slice)."""

    def __init__(self, core: DetectionCore, max_batch: int) -> None:
        super().__init__()
        self.core = core
        self.max_batch = max_batch

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = image.shape[0]  # traced: the graph reads it from the input's shape
        idx = torch.arange(self.max_batch, device=image.device)
        # An elementwise Min, not clamp_max: TensorRT's Clip wants constant bounds.
        idx = torch.minimum(idx, (b - 1) * torch.ones_like(idx))
        return tuple(out[:b] for out in self.core(image.index_select(0, idx)))


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
                      decoding: MaskDecoding | None = None, model_config: ModelConfig | None = None,
                      max_batch: int = 1) -> bytes:
    """ONNX model bytes for ``model``, input (B, C, H, W) with (C, H, W) = ``input_shape`` and
    1 <= B <= ``max_batch`` (computed at ``max_batch``, see the module docstring), its masks
    predicted with ``decoding`` (``model_config``: the model's pixel convention, see
    ``DetectionCore``)."""
    import onnx

    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    core = DetectionCore(model.eval(), decoding, model_config)
    # Different images, so no image's detection count can pass for another's in the trace.
    trace = torch.cat([trace_image(input_shape, seed) for seed in range(max_batch)])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PaddedBatch(core, max_batch), (trace,), buf,  # type: ignore[arg-type]  # file objects work
            dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), do_constant_folding=True,
            dynamic_axes={name: {0: BATCH_DIM} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )
    proto = onnx.load_from_string(buf.getvalue())
    _set_static_output_shapes(proto, core.k, core.m)
    for key, value in {**(metadata or {}), MAX_BATCH_KEY: str(max_batch)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def _set_static_output_shapes(proto: object, k: int, m: int) -> None:
    """Declare the outputs' shapes: the batch, then exactly K detections (DetectionCore pads to K).

    The tracer cannot prove the padded length is K, so it leaves a symbolic dimension; TensorRT
    and Triton need the static shape that the graph guarantees.
    """
    shapes = {"boxes": (k, 4), "scores": (k,), "mask_probs": (k, m, m), "num_detections": ()}
    for out in proto.graph.output:  # type: ignore[attr-defined]
        dims = out.type.tensor_type.shape.dim
        dims[0].Clear()
        dims[0].dim_param = BATCH_DIM
        for dim, value in zip(dims[1:], shapes[out.name]):
            dim.Clear()
            dim.dim_value = value


def export_checkpoint_onnx(ckpt: Checkpoint, decoding: MaskDecoding | None = None, version: str = "",
                           max_batch: int = 1) -> bytes:
    """ONNX bytes of a checkpoint's network, with its metadata; masks predicted with ``decoding``
    (default: the checkpoint's own, ``Checkpoint.mask_decoding``), up to ``max_batch`` images
    per run."""
    decoding = decoding or ckpt.mask_decoding
    meta = {"nanoseg.model_config": json.dumps(ckpt.model_config.model_dump(mode="json"), sort_keys=True),
            "nanoseg.input_spec": json.dumps(dict(ckpt.input_spec), sort_keys=True),
            METADATA_KEY: decoding.model_dump_json(),
            "nanoseg.version": version}
    return export_onnx_bytes(ckpt.build(), input_shape(ckpt), meta, decoding, ckpt.model_config, max_batch)


def read_onnx_metadata(onnx_bytes: bytes) -> dict[str, str]:
    """An ONNX file's metadata_props as a dict."""
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}



def max_batch_of(metadata: dict[str, str], input_dims: list[int | str | None], source: str = "<graph>") -> int:
    """The most images a graph takes per run: its ``nanoseg.max_batch`` metadata, else (a graph
    exported before it had a batch dimension) its static first input dimension.

    Parameters
    ----------
    metadata : dict
        The graph's metadata_props.
    input_dims : list
        The ``image`` input's dimensions (int where static, a name or None where not).
    source : str, optional
        Where the graph came from (a file path), for error messages.

    Returns
    -------
    int
        >= 1.

    Raises
    ------
    ValueError
        If ``nanoseg.max_batch`` is not an integer >= 1 (a graph that would run no image), or it is
        absent and the batch dimension is not static; the message names ``source`` and the key.
    """
    if MAX_BATCH_KEY in metadata:
        raw = metadata[MAX_BATCH_KEY]
        try:
            value = int(raw.strip())
        except (AttributeError, ValueError):
            value = 0
        if value < 1:
            raise ValueError(f"{source}: metadata {MAX_BATCH_KEY} is {raw!r}, expected an integer >= 1 "
                             "(images per run); export the graph again (nanoseg export)")
        return value
    if isinstance(input_dims[0], int) and input_dims[0] > 0:
        return input_dims[0]
    raise ValueError(f"{source}: the graph's batch dimension {input_dims[0]!r} is dynamic and its metadata "
                     f"lacks {MAX_BATCH_KEY}")
