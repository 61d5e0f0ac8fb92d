"""The triton engine against a real Triton Inference Server on loopback.

The server is pytriton's bundled ``tritonserver`` in a child process (tests/nanoseg/
triton_fixtures.py), serving the registry's ``model.onnx`` through an inference function that
runs ONNX Runtime. Skipped with the reason when the pytriton environment or tritonclient is
missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nanoseg.engines import EngineError, RawDetections
from nanoseg.engines.onnx_engine import OnnxEngine
from nanoseg.export import trace_image
from nanoseg_sim.demo import free_ports
from nanoseg_training.registry import Registry
from tests.nanoseg.triton_fixtures import (
    TritonServer,
    python_backend_variant,
    pytriton_python,
)

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install -e .[triton])")
PYTRITON, WHY = pytriton_python()
pytestmark = pytest.mark.skipif(PYTRITON is None, reason=WHY)


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory, trained_model_path: Path) -> tuple[Registry, str]:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    return reg, reg.register(trained_model_path).version


@pytest.fixture(scope="module")
def server(version: tuple[Registry, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    reg, v = version
    assert PYTRITON is not None
    srv = TritonServer(PYTRITON, tmp_path_factory.mktemp("triton") / "server.log", onnx=reg.path(v) / "model.onnx")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def inputs() -> np.ndarray:
    """A wire pattern that yields detections, and an empty frame (zero detections must work)."""
    return np.concatenate([trace_image((1, 512, 512)).numpy(), np.zeros((1, 1, 512, 512), np.float32)])


def assert_same(a: list[RawDetections], b: list[RawDetections]) -> None:
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.boxes, y.boxes, atol=1e-3)
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)
        np.testing.assert_allclose(x.mask_probs, y.mask_probs, atol=1e-5)


def test_triton_engine_matches_local_onnxruntime(server: TritonServer, version: tuple[Registry, str]) -> None:
    from nanoseg.engines.triton_engine import TritonEngine

    reg, v = version
    remote = TritonEngine(server.url, "nanoseg")
    local = OnnxEngine(str(reg.path(v) / "model.onnx"), threads=1)
    assert remote.input_shape == local.input_shape == (1, 512, 512)
    got = remote.infer(inputs())
    # A scene with wires gives confident detections; the empty frame no instance (its raw outputs
    # may hold degenerate sub-pixel boxes on the border, which post-processing removes).
    from nanoseg.postprocess import PostprocessConfig, filter_instances, to_instances

    post = PostprocessConfig()
    assert len(got[0]) > 0 and (got[0].scores > 0.5).any()
    assert len(filter_instances(to_instances(got[1], (512, 512), post), post)) == 0
    assert_same(got, local.infer(inputs()))
    remote.close()


def test_daemon_with_triton_engine_end_to_end(server: TritonServer, version: tuple[Registry, str],
                                              tmp_path: Path) -> None:
    """The same frames through a daemon on engine triton and one on local onnxruntime."""
    from nanoseg_daemon.store import ResultReader, default_path
    from tests.daemon.service_fixtures import (
        DOSE,
        Client,
        raw_header,
        start_service,
        transmission_frame,
    )

    reg, v = version
    frames = [transmission_frame(11, i) for i in range(2)]
    engines = {"triton": {"model.engine": "triton", "model.triton_url": server.url, "model.triton_model": "nanoseg"},
               "onnxruntime": {"model.engine": "onnxruntime", "model.onnx_path": str(reg.path(v) / "model.onnx")}}
    results = {}
    for name, extra in engines.items():
        svc = start_service(tmp_path / name, reg.path(v) / "model.pt", **{"model.threads": "1", **extra})
        client = Client(svc)
        try:
            assert (svc.slot.current.engine, svc.slot.current.device) == \
                (name, f"{server.url}/nanoseg" if name == "triton" else "cpu")
            for i, f in enumerate(frames):
                client.send([raw_header(i, f.counts, pixel_size_nm=8.0, i0=DOSE), f.counts.tobytes()])
            summaries = list(client.summaries(len(frames)))
        finally:
            client.close()
            svc.stop()
        particles = ResultReader(default_path(tmp_path / name)).particles("raw:detector:r1")
        results[name] = (summaries, particles)
    (st, pt), (so, po) = results["triton"], results["onnxruntime"]
    assert [s["count"] for s in st] == [s["count"] for s in so] and sum(s["count"] for s in st) > 0
    assert [json.dumps(p["mask_rle"], sort_keys=True) for p in pt] == [json.dumps(p["mask_rle"], sort_keys=True) for p in po]
    for a, b in zip(pt, po):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_unavailable_server_or_model_is_a_clear_engine_error(server: TritonServer, version: tuple[Registry, str],
                                                              tmp_path: Path) -> None:
    from nanoseg.engines.triton_engine import TritonEngine

    nobody = f"127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(EngineError, match=r"triton: model 'nanoseg' at 127.0.0.1:\d+: server unavailable"):
        TritonEngine(nobody, "nanoseg", connect_timeout_s=1.0)
    with pytest.raises(EngineError, match=r"model 'nope' .*: model not ready"):
        TritonEngine(server.url, "nope", connect_timeout_s=1.0)

    reg, v = version
    assert PYTRITON is not None
    doomed = TritonServer(PYTRITON, tmp_path / "doomed.log", onnx=reg.path(v) / "model.onnx")
    try:
        doomed.wait_ready()
        engine = TritonEngine(doomed.url, "nanoseg", retries=2, backoff_s=0.1, timeout_s=5.0)
    finally:
        doomed.stop()  # the server goes away between frames
    with pytest.raises(EngineError, match=r"inference failed after 3 tries \(StatusCode.UNAVAILABLE"):
        engine.infer(inputs()[:1])


def test_exported_repository_on_the_bundled_server(version: tuple[Registry, str], tmp_path: Path) -> None:
    """export-triton's repository: as written it needs the onnxruntime backend, which the pytriton
    wheel lacks (the server says so); with only its backend line swapped for the Python backend
    (same config, same model.onnx), the bundled server loads and answers it."""
    from nanoseg.engines.triton_engine import TritonEngine
    from nanoseg_training.triton_repo import export_triton

    reg, v = version
    assert PYTRITON is not None
    repo = tmp_path / "repo"
    export_triton(reg, v, repo, cpu=True, count=2)
    as_written = TritonServer(PYTRITON, tmp_path / "as_written.log", repo=repo)
    try:
        with pytest.raises(RuntimeError, match="unable to find backend library for backend 'onnxruntime'"):
            as_written.wait_ready()
    finally:
        as_written.stop()

    srv = TritonServer(PYTRITON, tmp_path / "python_backend.log", repo=python_backend_variant(repo, tmp_path / "py"))
    try:
        srv.wait_ready()
        log = srv.log_tail(20000)
        assert "nanoseg_0_0 (CPU device 0)" in log and "nanoseg_0_1 (CPU device 0)" in log  # count: 2
        remote = TritonEngine(srv.url, "nanoseg")
        assert_same(remote.infer(inputs()), OnnxEngine(str(reg.path(v) / "model.onnx"), threads=1).infer(inputs()))
        remote.close()
    finally:
        srv.stop()
