"""Create an engine from a model file: a nanoseg checkpoint (.pt), an ONNX file or a TensorRT plan.

Engine ``triton`` runs remotely, on the server and model a ``TritonTarget`` names. Engine ``null``
(``null_engine.py``) runs no network: fixed detections at the checkpoint's input shape, for
measuring what surrounds inference.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from nanoseg.checkpoint import Checkpoint, input_shape, load_checkpoint
from nanoseg.engines import Engine, EngineError
from nanoseg.engines.triton_engine import TritonTarget
from nanoseg.export import export_checkpoint_onnx, read_onnx_metadata
from nanoseg.input_spec import InputSpec
from nanoseg.mask_decoding import MaskDecoding, decoding_from_metadata, with_decoding

EngineKind = Literal["torch", "onnxruntime", "tensorrt", "triton", "null"]


def engine_from_checkpoint(ckpt: Checkpoint, kind: EngineKind, device: str = "cpu", threads: int = 2,
                           onnx_path: str | Path | None = None, cache_dir: Path | None = None,
                           triton: TritonTarget | None = None, decoding: MaskDecoding | None = None,
                           max_batch: int = 1, null_detections: int | None = None) -> Engine:
    """An engine of ``kind`` for ``ckpt``, predicting masks with ``decoding`` (default: the
    checkpoint's own) and saying so in its ``mask_decoding``. ONNX is exported on the fly when no
    file is given, taking up to ``max_batch`` images per run (a given file says its own); a given
    file must have been exported with that decoding. Engine ``triton`` needs ``triton`` (the
    server must serve this checkpoint's model, exported with its decoding). Engine ``null``
    returns ``null_detections`` of its fixed rods per input (None: all)."""
    return engine_instances(ckpt, kind, 1, device, threads, onnx_path, cache_dir, triton, decoding, max_batch,
                            null_detections)[0]


def engine_instances(ckpt: Checkpoint, kind: EngineKind, instances: int, device: str = "cpu", threads: int = 2,
                     onnx_path: str | Path | None = None, cache_dir: Path | None = None,
                     triton: TritonTarget | None = None, decoding: MaskDecoding | None = None,
                     max_batch: int = 1, null_detections: int | None = None) -> list[Engine]:
    """``instances`` engines as ``engine_from_checkpoint`` makes one (same arguments), each with
    its own session, context or module, so that several threads run the network at once; an ONNX
    graph is exported (or read and checked) once for all of them.

    Parameters
    ----------
    instances : int
        Engines wanted, >= 1.

    Returns
    -------
    list of Engine
        ``instances`` independent engines, the same model and decoding.
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    decoding = decoding or ckpt.mask_decoding
    graph = _onnx_graph(ckpt, onnx_path, decoding, max_batch) if kind in ("onnxruntime", "tensorrt") else None
    out: list[Engine] = []
    for _ in range(instances):
        eng = _engine(ckpt, kind, device, threads, graph, cache_dir, triton, decoding, null_detections)
        eng.mask_decoding = decoding
        out.append(eng)
    return out


def _onnx_graph(ckpt: Checkpoint, onnx_path: str | Path | None, decoding: MaskDecoding, max_batch: int) -> bytes:
    """The graph in ``onnx_path`` (checked to be exported with ``decoding``), else exported now."""
    if not onnx_path:
        return export_checkpoint_onnx(ckpt, decoding, max_batch=max_batch)
    onnx_bytes = Path(onnx_path).read_bytes()
    exported = decoding_from_metadata(read_onnx_metadata(onnx_bytes))
    if exported != decoding:
        raise EngineError(f"{onnx_path}: exported with mask decoding {exported.model_dump()}, the model "
                          f"is to run with {decoding.model_dump()}; export it again (nanoseg export)")
    return onnx_bytes


def _engine(ckpt: Checkpoint, kind: EngineKind, device: str, threads: int, onnx_bytes: bytes | None,
            cache_dir: Path | None, triton: TritonTarget | None, decoding: MaskDecoding,
            null_detections: int | None = None) -> Engine:
    if kind == "torch":
        from nanoseg.engines.torch_engine import TorchEngine

        return TorchEngine(ckpt.build(), input_shape(ckpt), device=device, threads=threads, decoding=decoding,
                           model_config=ckpt.model_config)
    if kind == "null":
        from nanoseg.engines.null_engine import DETECTIONS, NullEngine

        return NullEngine(input_shape(ckpt), detections=len(DETECTIONS) if null_detections is None else null_detections)
    if kind == "triton":
        from nanoseg.engines.triton_engine import TritonEngine

        if triton is None:
            raise EngineError("engine triton needs a server and model name (TritonTarget)")
        if decoding != ckpt.mask_decoding:
            raise EngineError("triton: the server runs the graph the registry exported with the checkpoint's "
                              f"mask decoding {ckpt.mask_decoding.model_dump()}; another cannot be asked for")
        remote = TritonEngine(triton.url, triton.model)
        if remote.input_shape != input_shape(ckpt):
            raise EngineError(f"triton: {remote.device} takes {remote.input_shape}, "
                              f"the checkpoint's model {input_shape(ckpt)}")
        return remote
    if onnx_bytes is not None and kind == "onnxruntime":
        from nanoseg.engines.onnx_engine import OnnxEngine

        return OnnxEngine(onnx_bytes, device=device, threads=threads)
    if onnx_bytes is not None and kind == "tensorrt":
        from nanoseg.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine.from_onnx(onnx_bytes, cache_dir=cache_dir)
    raise EngineError(f"unknown engine {kind!r}: choose torch, onnxruntime, tensorrt, triton or null")


def load_engine(model_path: str | Path, kind: EngineKind, device: str = "cpu", threads: int = 2,
                onnx_path: str | Path | None = None, cache_dir: Path | None = None,
                triton: TritonTarget | None = None, mask_margin_px: float | None = None,
                mask_tta: int | None = None, refine_boxes: int | None = None,
                max_detections: int | None = None, max_batch: int = 1) -> tuple[Engine, Checkpoint]:
    """The checkpoint at ``model_path`` and an engine for it; ``mask_margin_px``, ``mask_tta`` and
    ``refine_boxes`` replace those of its mask decoding (None keeps the model's);
    ``max_detections`` raises its cap of detections per model input (``with_max_detections``);
    ``max_batch``: images per run of a graph exported here."""
    ckpt = load_checkpoint(model_path)
    if max_detections is not None:
        ckpt = with_max_detections(ckpt, max_detections)
    decoding = with_decoding(ckpt.mask_decoding, mask_margin_px, mask_tta, refine_boxes)
    return engine_from_checkpoint(ckpt, kind, device, threads, onnx_path, cache_dir, triton, decoding, max_batch), ckpt


def with_max_detections(ckpt: Checkpoint, n: int) -> Checkpoint:
    """``ckpt`` keeping up to ``n`` detections per model input (``detections_per_img``), its RPN
    keeping at least ``n`` proposals after and before NMS at test time. The weights do not
    depend on these: a field of hundreds of small rods needs more than a model's training cap."""
    cfg = ckpt.model_config
    update = {"detections_per_img": n,
              "rpn_post_nms_top_n_test": max(cfg.rpn_post_nms_top_n_test, n),
              "rpn_pre_nms_top_n_test": max(cfg.rpn_pre_nms_top_n_test, n)}
    return replace(ckpt, model_config=cfg.model_validate({**cfg.model_dump(), **update}))


def input_spec_of(ckpt: Checkpoint) -> InputSpec:
    return InputSpec.model_validate(ckpt.input_spec)
