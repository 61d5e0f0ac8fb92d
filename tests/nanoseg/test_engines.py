"""Engines behind one interface: ONNX Runtime reproduces torch on the exported graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoseg.checkpoint import input_shape, load_checkpoint
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.instances import Instances
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter

POST = PostprocessConfig(score_threshold=0.3, min_area_px=0)


@pytest.fixture(scope="module")
def engines(trained_model_path: Path) -> tuple[Segmenter, Segmenter]:
    ckpt = load_checkpoint(trained_model_path)
    torch_seg = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch", threads=2), ckpt, POST)
    ort_seg = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "onnxruntime", threads=2), ckpt, POST)
    return torch_seg, ort_seg


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def match(a: Instances, b: Instances) -> list[tuple[int, int]]:
    """Greedy one-to-one matching by box IoU, best pairs first."""
    if len(a) == 0 or len(b) == 0:
        return []
    iou = box_iou(a.boxes, b.boxes)
    pairs = []
    used_a, used_b = set(), set()
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if i in used_a or j in used_b or iou[i, j] <= 0.5:
            continue
        used_a.add(int(i))
        used_b.add(int(j))
        pairs.append((int(i), int(j)))
    return pairs


def test_onnxruntime_matches_torch(engines: tuple[Segmenter, Segmenter], paper_samples: list) -> None:
    torch_seg, ort_seg = engines
    total = 0
    for gray, _gt in paper_samples:
        a, b = torch_seg.segment_gray(gray), ort_seg.segment_gray(gray)
        assert len(a) > 0, "the trained model finds wires in a paper-preset scene"
        pairs = match(a, b)
        # Scores within 1e-3 can cross the threshold in one engine only: those may be unmatched.
        near = np.abs(a.scores - POST.score_threshold) < 1e-3
        assert len(pairs) >= len(a) - int(near.sum())
        assert len(pairs) >= len(b) - int((np.abs(b.scores - POST.score_threshold) < 1e-3).sum())
        for i, j in pairs:
            assert box_iou(a.boxes[i: i + 1], b.boxes[j: j + 1])[0, 0] >= 0.99
            assert mask_iou(a.masks[i], b.masks[j]) >= 0.98
            assert abs(float(a.scores[i]) - float(b.scores[j])) <= 1e-3
        total += len(pairs)
    assert total >= 5


def test_empty_frame_gives_no_instances(engines: tuple[Segmenter, Segmenter]) -> None:
    for seg in engines:
        inst = seg.segment_gray(np.zeros((512, 512), np.float32))
        assert len(inst) == 0
        assert inst.masks.shape == (0, 512, 512)


@pytest.mark.parametrize("tta", [1, 8])
def test_onnx_graph_is_static_and_standard(trained_model_path: Path, tta: int) -> None:
    """Also with mask TTA, margin and box refinement in the graph (flips and transposes are
    Slice and Transpose; the views' mean a ReduceMean) and the shipped model's mask refiner
    (RoiAlign, Resize, dilated Conv): what TensorRT parses."""
    import onnx

    from nanoseg.export import export_checkpoint_onnx
    from nanoseg.mask_decoding import MaskDecoding
    from nanoseg.model import mask_resolution

    ckpt = load_checkpoint(trained_model_path)
    decoding = MaskDecoding(margin_px=1.0, tta=tta, refine_boxes=2)
    proto = onnx.load_from_string(export_checkpoint_onnx(ckpt, decoding))

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(proto.graph.input[0]) == ["batch", *input_shape(ckpt)]  # only the batch is dynamic
    out_dims = {o.name: dims(o) for o in proto.graph.output}
    k = ckpt.model_config.detections_per_img
    m = mask_resolution(ckpt.model_config)  # the refiner's grid if the model has one
    assert out_dims["boxes"] == ["batch", k, 4] and out_dims["mask_probs"] == ["batch", k, m, m]
    assert out_dims["num_detections"] == ["batch"]
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"custom op domains {domains}"
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Loop", "Scan", "SequenceConstruct", "SplitToSequence"}, ops


def test_batched_graph_matches_batch_one(trained_model_path: Path, paper_samples: list) -> None:
    """A graph exported at max_batch 2 runs 1 or 2 different images (one of them empty) in one
    session.run, each exactly as the batch-1 graph runs it alone: no image's detection count
    was frozen into the graph, and the padding image's outputs are cut off."""
    from nanoseg.engines.onnx_engine import OnnxEngine
    from nanoseg.export import export_checkpoint_onnx

    ckpt = load_checkpoint(trained_model_path)
    two, one = (OnnxEngine(export_checkpoint_onnx(ckpt, max_batch=k), threads=2) for k in (2, 1))
    assert (two.max_batch, one.max_batch) == (2, 1)
    images = np.stack([paper_samples[0][0], np.zeros((512, 512), np.float32), paper_samples[1][0]])[:, None]
    alone = [one.infer(images[i: i + 1])[0] for i in range(3)]
    assert [len(r) for r in alone][1] == 0 and min(len(alone[0]), len(alone[2])) >= 5
    assert len(alone[0]) != len(alone[2])  # the images differ in their counts
    for batch in ([0, 1], [2, 0], [1], [0, 1, 2]):  # three images: two runs of the graph
        got = two.infer(images[batch])
        assert len(got) == len(batch)
        for raw, i in zip(got, batch):
            ref = alone[i]
            assert len(raw) == len(ref)
            np.testing.assert_allclose(raw.boxes, ref.boxes, atol=1e-3)
            np.testing.assert_allclose(raw.scores, ref.scores, atol=1e-5)
            np.testing.assert_allclose(raw.mask_probs, ref.mask_probs, atol=1e-4)


def test_tensorrt_batch_profile() -> None:
    """The optimisation profile TensorRT builds for the graph: batch 1 to max_batch (checked
    without TensorRT, which cannot be installed here)."""
    from nanoseg.engines import EngineError
    from nanoseg.engines.tensorrt_engine import batch_profile

    assert batch_profile([-1, 1, 512, 512], 8) == ((1, 1, 512, 512), (8, 1, 512, 512))
    assert batch_profile([1, 1, 512, 512], 8) == ((1, 1, 512, 512), (1, 1, 512, 512))  # an older static graph
    with pytest.raises(EngineError, match="C, H, W static"):
        batch_profile([-1, 1, -1, 512], 8)


def test_triton_request_sizes() -> None:
    """How the triton engine spreads a batch over its requests in flight (no server needed)."""
    from nanoseg.engines.triton_engine import request_sizes

    assert request_sizes(4, 4, 1) == [1, 1, 1, 1]  # batch-1 static model: one image per request
    assert request_sizes(8, 4, 8) == [2, 2, 2, 2]  # every instance gets work
    assert request_sizes(5, 4, 8) == [2, 2, 1]
    assert request_sizes(3, 8, 4) == [1, 1, 1]
    assert request_sizes(16, 2, 4) == [4, 4, 4, 4]
    assert request_sizes(0, 4, 8) == []


def test_triton_engine_without_a_server_is_a_clear_engine_error() -> None:
    """The client side that runs without a server: nothing listens on the port, so the engine
    gives up after its connect timeout and names the server, the model and the reason."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install -e .[triton])")
    from nanoseg.engines import EngineError
    from nanoseg.engines.triton_engine import TritonEngine
    from nanoseg_sim.demo import free_ports

    (port,) = free_ports(1)
    with pytest.raises(EngineError, match=rf"model 'nanoseg' at 127.0.0.1:{port}: server unavailable .* after 1 s"):
        TritonEngine(f"127.0.0.1:{port}", "nanoseg", timeout_s=0.5, backoff_s=0.1, connect_timeout_s=1.0)


def test_tensorrt_engine(trained_model_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on these CPU machines (NVIDIA index unreachable)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none on this machine")
    ckpt = load_checkpoint(trained_model_path)
    trt_engine = engine_from_checkpoint(ckpt, "tensorrt", device="cuda")
    seg = Segmenter.for_checkpoint(trt_engine, ckpt, POST)
    ref = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch"), ckpt, POST)
    from nanoseg.export import trace_image

    img = trace_image((1, 512, 512), 3).numpy()[0, 0]
    a, b = ref.segment_gray(img), seg.segment_gray(img)
    pairs = match(a, b)
    assert len(pairs) >= 0.9 * max(len(a), 1)  # FP16: allow borderline detections to differ
    for i, j in pairs:
        assert mask_iou(a.masks[i], b.masks[j]) >= 0.9


def test_torch_engine_on_cuda_matches_cpu(trained_model_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (benchmarks/gpu_check.py ran this on a lent H200)")
    from nanoseg.export import trace_image

    ckpt = load_checkpoint(trained_model_path)
    cpu = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch"), ckpt, POST)
    gpu = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch", device="cuda"), ckpt, POST)
    img = trace_image((1, 512, 512), 3).numpy()[0, 0]
    a, b = cpu.segment_gray(img), gpu.segment_gray(img)
    assert len(a) == len(b) and len(match(a, b)) == len(a)


def test_triton_engine_needs_a_server_and_model(trained_model_path: Path) -> None:
    from nanoseg.engines import EngineError

    with pytest.raises(EngineError, match="engine triton needs a server and model"):
        engine_from_checkpoint(load_checkpoint(trained_model_path), "triton")


def test_mask_head_pooling_from_p2_only_exports_and_matches_torch(trained_model_path: Path,
                                                                  paper_samples: list) -> None:
    """``mask_pool_levels: 1`` (every mask ROI pooled from P2) is one plain RoiAlign in the ONNX
    graph and ONNX Runtime reproduces torch's mask probabilities on it."""
    import dataclasses

    import onnx

    from nanoseg.export import export_onnx_bytes
    from nanoseg.model import ModelConfig

    ckpt = load_checkpoint(trained_model_path)
    p2 = dataclasses.replace(ckpt, model_config=ckpt.model_config.model_copy(update={"mask_pool_levels": 1}))
    model = p2.build()
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0"]
    assert ckpt.build().roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2", "3"]
    proto = onnx.load_from_string(export_onnx_bytes(model, input_shape(p2)))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    t, o = (engine_from_checkpoint(p2, kind, threads=2) for kind in ("torch", "onnxruntime"))
    gray = paper_samples[0][0]
    a, b = t.infer(gray[None, None].astype(np.float32))[0], o.infer(gray[None, None].astype(np.float32))[0]
    keep = a.scores >= 0.3
    assert keep.sum() >= 3
    np.testing.assert_allclose(a.boxes[keep], b.boxes[keep], atol=0.05)
    np.testing.assert_allclose(a.mask_probs[keep], b.mask_probs[keep], atol=2e-3)
    with pytest.raises(ValueError, match="mask_pool_levels"):
        ModelConfig(semantics="detectron2", roi_aligned=True, in_channels=3, image_mean=(0, 0, 0),
                    image_std=(1, 1, 1), mask_pool_levels=1)
