"""int8 graphs (``nanoseg export --int8``): ONNX Runtime static quantisation of the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from nanoseg.checkpoint import load_checkpoint
from nanoseg.cli import main
from nanoseg.engines.onnx_engine import OnnxEngine, int8_saturation_risk
from nanoseg.export import export_checkpoint_onnx
from nanoseg_training.quantize import float_nodes, quantize_int8


@pytest.fixture(scope="module")
def graphs(trained_model_path: Path, paper_samples: list) -> tuple[bytes, bytes]:
    """The float32 graph and its int8 one, calibrated on two paper scenes (seed 7: not a test set),
    the mask refiner kept float32."""
    fp32 = export_checkpoint_onnx(load_checkpoint(trained_model_path))
    frames = (gray[None, None] for gray, _ in paper_samples[:2])
    return fp32, quantize_int8(fp32, frames, keep_float=["/mask_refiner/"])


def test_int8_graph_quantises_the_convolutions_except_the_kept_ones(graphs: tuple[bytes, bytes]) -> None:
    fp32, int8 = graphs
    proto = onnx.load_from_string(int8)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["nanoseg.precision"] == "int8" and meta["nanoseg.max_batch"] == "1"
    dequantised = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    quantised = {n.name for n in convs if n.input[1] in dequantised}  # int8 weights
    kept = set(float_nodes(fp32, ["/mask_refiner/"]))
    assert kept and not kept & quantised
    assert len(quantised) >= 40  # backbone, FPN, RPN and mask head convolutions
    with pytest.raises(ValueError, match="matches no"):
        float_nodes(fp32, ["/no_such_part/"])


def test_int8_engine_finds_what_float32_finds(graphs: tuple[bytes, bytes], paper_samples: list) -> None:
    """On a scene it was not calibrated on, the int8 graph finds the confident float32 detections
    at nearly the same boxes (the AP on the paper test set is in BENCHMARKS.md)."""
    fp32, int8 = (OnnxEngine(g, threads=2) for g in graphs)
    assert (fp32.precision, int8.precision) == ("float32", "int8")
    x = paper_samples[2][0][None, None]
    a, b = fp32.infer(x)[0], int8.infer(x)[0]
    confident = a.boxes[a.scores >= 0.5]
    assert len(confident) >= 5
    for box in confident:
        lt, rb = np.maximum(box[:2], b.boxes[:, :2]), np.minimum(box[2:], b.boxes[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        union = np.prod(box[2:] - box[:2]) + np.prod(b.boxes[:, 2:] - b.boxes[:, :2], axis=1) - inter
        assert (inter / union).max() >= 0.8


def test_int8_graph_runs_a_frame_without_detections(graphs: tuple[bytes, bytes]) -> None:
    """A blank frame (the daemon's warm-up is one) gives no detections, not an error: ONNX
    Runtime's optimised int8 graph could not reshape the box clipping's stack of none."""
    for g in graphs:
        (raw,) = OnnxEngine(g, threads=1).infer(np.zeros((1, 1, 512, 512), np.float32))
        assert len(raw.scores) == 0


def test_seven_bit_weights_are_recorded_and_spare_cpus_without_vnni(graphs: tuple[bytes, bytes],
                                                                     paper_samples: list) -> None:
    """``--reduce-range``: the graph says its weights use 7 bits; only a full-range int8 graph on
    an x86 CPU without VNNI is at risk of saturating (BENCHMARKS.md: -2.3 mask AP there)."""
    fp32, int8 = graphs
    seven = quantize_int8(fp32, (gray[None, None] for gray, _ in paper_samples[:2]), reduce_range=True)
    engines = [OnnxEngine(g, threads=1) for g in (fp32, int8, seven)]
    assert [(e.precision, e.int8_reduce_range) for e in engines] == [("float32", False), ("int8", False),
                                                                      ("int8", True)]
    x = paper_samples[2][0][None, None]
    assert len(engines[2].infer(x)[0].scores) > 0
    without_vnni, with_vnni, arm = {"sse4_1", "avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}, {"asimd", "asimddp"}
    assert int8_saturation_risk("int8", False, without_vnni)
    assert not int8_saturation_risk("int8", True, without_vnni)
    assert not int8_saturation_risk("float32", False, without_vnni)
    assert not int8_saturation_risk("int8", False, with_vnni)
    assert not int8_saturation_risk("int8", False, {"avx2", "avx_vnni"})
    assert not int8_saturation_risk("int8", False, arm) and not int8_saturation_risk("int8", False, set())


def test_export_int8_needs_a_calibration_set(trained_model_path: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(trained_model_path), "--int8", "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", str(trained_model_path), "--reduce-range", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--int8 needs --format onnx and --calibration DIR" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
