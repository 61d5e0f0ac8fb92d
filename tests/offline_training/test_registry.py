"""The model registry through ``nanoseg models ...``: versions, manifest, AP gate, rollback,
refusal of corrupt artifacts, and the Triton repository export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from nanoseg.checkpoint import load_checkpoint
from nanoseg.cli import main
from nanoseg.engines.detection_core import INPUT_NAME, OUTPUT_NAMES
from nanoseg.model import mask_resolution
from nanoseg_training.registry import Registry
from tests.offline_training.registry_fixtures import degraded_checkpoint, tamper, validation_set


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, trained_model_path: Path) -> tuple[Registry, Path]:
    """v0001 = the trained model, v0002 = its degraded copy with a (stand-in) TensorRT plan."""
    d = tmp_path_factory.mktemp("registry")
    plan = d / "stand_in.plan"
    plan.write_bytes(os.urandom(4096))  # no GPU here to build a real plan; export only copies it
    degraded = degraded_checkpoint(trained_model_path, d / "degraded.pt")
    root = d / "reg"
    assert main(["models", "register", str(trained_model_path), "--registry", str(root)]) == 0
    assert main(["models", "register", str(degraded), "--plan", str(plan), "--registry", str(root)]) == 0
    return Registry(root), validation_set(d / "val")


def models(*args: str) -> int:
    return main(["models", *args])


def test_register_writes_checksummed_manifest(registry: tuple[Registry, Path], trained_model_path: Path) -> None:
    reg, _ = registry
    assert reg.versions() == ["v0001", "v0002"]
    man = reg.manifest("1")
    d = reg.path("v0001")
    assert (d / "model.pt").read_bytes() == trained_model_path.read_bytes()
    for name in ("model.pt", "model.onnx"):
        assert man.artifacts[name].sha256 == hashlib.sha256((d / name).read_bytes()).hexdigest()
        assert (d / name).stat().st_mode & 0o222 == 0  # read-only
    assert "model.plan" not in man.artifacts and "model.plan" in reg.manifest("v2").artifacts
    assert man.input_spec["pixel_size_nm"] == 8.0 and man.net_config["in_channels"] == 1
    assert man.training["train_config"] and "data_seed" in man.training
    io = man.onnx_io
    # The batch dimension is dynamic (-1); the registry's graph runs 1 image (nanoseg.max_batch 1).
    assert list(io["inputs"]) == [INPUT_NAME] and io["inputs"][INPUT_NAME]["shape"] == [-1, 1, 512, 512]
    assert list(io["outputs"]) == list(OUTPUT_NAMES) and io["outputs"]["num_detections"]["dtype"] == "int64"
    meta = {p.key: p.value for p in onnx.load(str(d / "model.onnx")).metadata_props}
    assert meta["nanoseg.version"].endswith("@v0001") and meta["nanoseg.max_batch"] == "1"


def test_promote_gate_force_and_rollback(registry: tuple[Registry, Path], capsys: pytest.CaptureFixture[str]) -> None:
    reg, val = registry
    r = ["--registry", str(reg.root)]
    ev = ["--val", str(val), "--limit", "2", "--threads", "1"]
    assert models("rollback", *r) == 2  # nothing promoted yet
    assert models("promote", "v1", *r, *ev) == 0
    assert reg.current() == "v0001" and (reg.root / "current").resolve() == reg.path("v0001")
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["candidate_mask_ap"] > 10 and first["baseline_mask_ap"] is None

    assert models("promote", "v2", *r, *ev) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "below the current model's" in err and "--force" in err
    assert reg.current() == "v0001"
    ap = {v: reg.manifest(v).evaluations[-1].mask_ap for v in reg.versions()}
    assert ap["v0002"] < ap["v0001"] - 2.0  # type: ignore[operator]

    assert models("promote", "v2", *r, *ev, "--force") == 0
    assert "FORCED" in capsys.readouterr().err and reg.current() == "v0002"
    forced = [h for h in reg.history() if h["action"] == "promote"][-1]
    assert forced["forced"] and "below" in forced["reason"] and forced["previous"] == "v0001"

    assert models("rollback", *r) == 0
    assert reg.current() == "v0001"
    assert models("rollback", *r) == 2  # v0001 was the first promotion
    assert [h["action"] for h in reg.history()][-4:] == ["promote", "refused", "promote", "rollback"]
    assert models("list", *r) == 0
    listing = capsys.readouterr().out
    assert "* v0001" in listing and "  v0002" in listing


def test_export_triton_repository(registry: tuple[Registry, Path], tmp_path: Path, trained_model_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc", reason="the optional triton extra is not installed (pip install -e .[triton])")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    reg, _ = registry
    repo = tmp_path / "repo"
    assert models("export-triton", "v2", "--repo", str(repo), "--registry", str(reg.root), "--gpus", "0,1",
                  "--instances", "2", "--queue-delay-us", "500") == 0
    onnx_cfg = text_format.Parse((repo / "nanoseg" / "config.pbtxt").read_text(), mc.ModelConfig())
    # The registry's graph takes one image: batched (max_batch_size 1) so the server may queue.
    assert onnx_cfg.backend == "onnxruntime" and onnx_cfg.max_batch_size == 1
    assert list(onnx_cfg.dynamic_batching.preferred_batch_size) == [1]
    assert onnx_cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(t.name, list(t.dims), t.data_type) for t in onnx_cfg.input] == [("image", [1, 512, 512], mc.TYPE_FP32)]
    outs = {t.name: (list(t.dims), t.data_type) for t in onnx_cfg.output}
    m = mask_resolution(load_checkpoint(trained_model_path).model_config)  # 56: the shipped model's refiner
    assert outs == {"boxes": ([50, 4], mc.TYPE_FP32), "scores": ([50], mc.TYPE_FP32),
                    "mask_probs": ([50, m, m], mc.TYPE_FP32), "num_detections": ([1], mc.TYPE_INT64)}
    num = next(t for t in onnx_cfg.output if t.name == "num_detections")
    assert num.HasField("reshape") and list(num.reshape.shape) == []
    assert [(g.kind, list(g.gpus), g.count) for g in onnx_cfg.instance_group] == \
        [(mc.ModelInstanceGroup.KIND_GPU, [0], 2), (mc.ModelInstanceGroup.KIND_GPU, [1], 2)]
    assert list(onnx_cfg.version_policy.specific.versions) == [2]
    assert (repo / "nanoseg" / "2" / "model.onnx").read_bytes() == (reg.path("v2") / "model.onnx").read_bytes()
    trt_cfg = text_format.Parse((repo / "nanoseg_trt" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert trt_cfg.platform == "tensorrt_plan" and trt_cfg.max_batch_size == 1
    assert (repo / "nanoseg_trt" / "2" / "model.plan").read_bytes() == (reg.path("v2") / "model.plan").read_bytes()

    cpu = tmp_path / "cpu"
    assert models("export-triton", "v1", "--repo", str(cpu), "--registry", str(reg.root), "--cpu") == 0
    cpu_cfg = text_format.Parse((cpu / "nanoseg" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [(g.kind, g.count) for g in cpu_cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert cpu_cfg.parameters["intra_op_thread_count"].string_value == "2"
    assert sorted(p.name for p in cpu.iterdir()) == ["nanoseg"]


def test_export_triton_at_a_larger_batch_reexports_the_graph(registry: tuple[Registry, Path], tmp_path: Path) -> None:
    """``--max-batch 2``: the verified model.pt is exported at 2, the config batches up to 2 (read
    as text: the config's contract needs no tritonclient)."""
    from nanoseg.engines.onnx_engine import OnnxEngine

    reg, _ = registry
    repo = tmp_path / "repo"
    assert models("export-triton", "v1", "--repo", str(repo), "--registry", str(reg.root), "--cpu",
                  "--max-batch", "2") == 0
    text = (repo / "nanoseg" / "config.pbtxt").read_text()
    assert "max_batch_size: 2\n" in text and "re-exported at max_batch 2" in text
    assert "preferred_batch_size: [ 2 ]" in text and "max_queue_delay_microseconds: 2000" in text
    assert "dims: [ 1, 512, 512 ]" in text and "dims: [ 50, 4 ]" in text
    graph = (repo / "nanoseg" / "1" / "model.onnx").read_bytes()
    assert graph != (reg.path("v1") / "model.onnx").read_bytes()
    assert OnnxEngine(graph, threads=1).max_batch == 2


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_artifact_is_refused_before_any_load(registry: tuple[Registry, Path], tmp_path: Path,
                                                     how: str, capsys: pytest.CaptureFixture[str]) -> None:
    reg, val = registry
    root = tmp_path / "reg"  # a private copy: the shared registry stays intact
    shutil.copytree(reg.root, root, symlinks=True)
    copy = Registry(root)
    evaluations = len(copy.manifest("v2").evaluations)
    history = len(copy.history())
    current = copy.current()  # v0001 after the promotion test, None where this test runs first (xdist)
    tamper(root / "versions" / "v0002" / "model.pt", how)
    r = ["--registry", str(root)]
    assert models("show", "v2", *r) == 2
    assert models("promote", "v2", *r, "--val", str(val), "--limit", "1", "--force") == 2
    err = capsys.readouterr().err
    expected = "bytes, the manifest says" if how == "truncate" else "does not match the manifest"
    assert err.count(expected) == 2 and "refusing to use v0002" in err
    assert copy.current() == current and current != "v0002"
    assert len(copy.manifest("v2").evaluations) == evaluations  # never evaluated (never loaded)
    assert len(copy.history()) == history
    assert models("export-triton", "v2", "--repo", str(tmp_path / "repo"), *r) == 2
    assert "refusing to use v0002" in capsys.readouterr().err and not (tmp_path / "repo").exists()
