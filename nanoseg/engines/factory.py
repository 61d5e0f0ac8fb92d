"""Create an engine from a model file: a nanoseg checkpoint (.pt), an ONNX file or a TensorRT plan.

Engine ``triton`` runs remotely, on the server and model a ``TritonTarget`` names. Engine ``null``
(``null_engine.py``) runs no network: fixed detections at the checkpoint's input shape, for
measuring what surrounds inference.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

from nanoseg.checkpoint import Checkpoint, input_shape, load_checkpoint
from nanoseg.engines import Engine, EngineError
from nanoseg.engines.detection_core import INPUT_NAME
from nanoseg.engines.triton_engine import TritonTarget
from nanoseg.export import export_checkpoint_onnx, max_batch_of
from nanoseg.input_spec import InputSpec
from nanoseg.mask_decoding import MaskDecoding, decoding_from_metadata, with_decoding
from nanoseg.paths import NotRegularFile, open_regular

MODEL_CONFIG_KEY = "nanoseg.model_config"
INPUT_SPEC_KEY = "nanoseg.input_spec"

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
    source = str(onnx_path) if onnx_path else None
    out: list[Engine] = []
    for _ in range(instances):
        eng = _engine(ckpt, kind, device, threads, graph, cache_dir, triton, decoding, null_detections, source)
        eng.mask_decoding = decoding
        out.append(eng)
    return out


def _onnx_graph(ckpt: Checkpoint, onnx_path: str | Path | None, decoding: MaskDecoding, max_batch: int) -> bytes:
    """The graph in ``onnx_path`` (checked to fit ``ckpt`` and ``decoding``), else exported now."""
    if not onnx_path:
        return export_checkpoint_onnx(ckpt, decoding, max_batch=max_batch)
    onnx_bytes = _read_graph_file(Path(onnx_path))
    check_graph_fits(onnx_bytes, ckpt, decoding, str(onnx_path))
    return onnx_bytes


def _read_graph_file(path: Path) -> bytes:
    """The bytes of an ONNX file; a FIFO, device or directory is refused before it is opened.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    EngineError
        If it is not a regular file or cannot be read; the message names it.
    """
    try:
        with open_regular(path) as f:
            return f.read()
    except NotRegularFile as err:
        raise EngineError(f"{path}: {err.strerror}; refusing to read it as an ONNX graph") from None
    except FileNotFoundError:
        raise
    except OSError as err:
        raise EngineError(f"{path}: cannot read the ONNX graph ({err.strerror or err})") from None


def check_graph_fits(onnx_bytes: bytes, ckpt: Checkpoint, decoding: MaskDecoding, source: str) -> None:
    """Refuse an ONNX graph that cannot serve as ``ckpt``'s model run with ``decoding``.

    Parameters
    ----------
    onnx_bytes : bytes
        The graph file's contents.
    ckpt : Checkpoint
        The model it is to be served as (its version is the checkpoint's).
    decoding : MaskDecoding
        The mask decoding the model is to run with.
    source : str
        The graph file's path, for error messages.

    Raises
    ------
    EngineError
        Naming ``source`` and the cause: an empty, truncated or corrupt file; no ``image(B, C, H, W)``
        input with C, H, W static; an input shape other than the checkpoint's (both named);
        malformed ``nanoseg.max_batch`` or ``nanoseg.mask_decoding`` metadata; another mask decoding.
    """
    import onnx

    if not onnx_bytes:
        raise EngineError(f"{source}: empty file (0 bytes), not an ONNX graph")
    try:
        proto = onnx.load_from_string(onnx_bytes)
    except Exception as err:  # google.protobuf DecodeError: truncated or not ONNX at all
        raise EngineError(f"{source}: not a readable ONNX graph, truncated or corrupt "
                          f"({type(err).__name__}: {err})") from None
    image = next((v for v in proto.graph.input if v.name == INPUT_NAME), None)
    if image is None:
        raise EngineError(f"{source}: the graph has no input {INPUT_NAME!r} (truncated, or not a nanoseg export)")
    dims: list[int | str | None] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in image.type.tensor_type.shape.dim]
    chw = [d for d in dims[1:] if isinstance(d, int) and d > 0]
    if len(dims) != 4 or len(chw) != 3:
        raise EngineError(f"{source}: expected input {INPUT_NAME}(B, C, H, W) with C, H, W static, got {dims}")
    shape = (chw[0], chw[1], chw[2])
    if shape != input_shape(ckpt):
        raise EngineError(f"{source}: the graph takes input (C, H, W) {shape}, the checkpoint's model "
                          f"{input_shape(ckpt)}; it is not this checkpoint's graph (export it again: nanoseg export)")
    meta = {p.key: p.value for p in proto.metadata_props}
    _check_recorded_model(meta, ckpt, source)
    try:
        max_batch_of(meta, dims, source)
        exported = decoding_from_metadata(meta, source)
    except ValueError as err:
        raise EngineError(str(err)) from None
    if exported != decoding:
        raise EngineError(f"{source}: exported with mask decoding {exported.model_dump()}, the model "
                          f"is to run with {decoding.model_dump()}; export it again (nanoseg export)")


def _check_recorded_model(meta: dict[str, str], ckpt: Checkpoint, source: str) -> None:
    """Refuse a graph whose metadata records another model than ``ckpt``: another backbone or
    channel count (``nanoseg.model_config``), or another input spec (``nanoseg.input_spec``).
    Entries that are absent or unreadable (graphs from older exports) are not compared."""
    try:
        recorded = json.loads(meta.get(MODEL_CONFIG_KEY, "{}"))
    except ValueError:
        recorded = {}
    ours = ckpt.model_config.model_dump(mode="json")
    if isinstance(recorded, dict):
        for key in ("backbone", "in_channels"):
            if key in recorded and recorded[key] != ours.get(key):
                raise EngineError(f"{source}: metadata {MODEL_CONFIG_KEY} has {key} {recorded[key]!r}, the "
                                  f"checkpoint's model {ours.get(key)!r}; it is not this checkpoint's graph "
                                  "(export it again: nanoseg export)")
    try:
        spec = InputSpec.model_validate_json(meta[INPUT_SPEC_KEY])
        ckpt_spec = InputSpec.model_validate(ckpt.input_spec)
    except (KeyError, ValueError):
        return
    if spec != ckpt_spec:
        raise EngineError(f"{source}: metadata {INPUT_SPEC_KEY} is {spec.model_dump(mode='json')}, the checkpoint's "
                          f"{ckpt_spec.model_dump(mode='json')}; it is not this checkpoint's graph "
                          "(export it again: nanoseg export)")


def _engine(ckpt: Checkpoint, kind: EngineKind, device: str, threads: int, onnx_bytes: bytes | None,
            cache_dir: Path | None, triton: TritonTarget | None, decoding: MaskDecoding,
            null_detections: int | None = None, onnx_source: str | None = None) -> Engine:
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

        return OnnxEngine(onnx_bytes, device=device, threads=threads, source=onnx_source)
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
