"""An ONNX file given with a checkpoint (``onnx_path``) that is broken or not that checkpoint's graph
is refused with an EngineError naming the file and the cause; it is never served.

Real files: the shipped model's exported graph, then truncated, emptied, its metadata or its input
shape changed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from nanoseg.checkpoint import Checkpoint, load_checkpoint
from nanoseg.engines import EngineError
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.engines.onnx_engine import OnnxEngine
from nanoseg.export import MAX_BATCH_KEY, export_checkpoint_onnx
from nanoseg.mask_decoding import METADATA_KEY


@pytest.fixture(scope="module")
def ckpt(trained_model_path: Path) -> Checkpoint:
    return load_checkpoint(trained_model_path)


@pytest.fixture(scope="module")
def graph(ckpt: Checkpoint) -> bytes:
    """The trained model's graph, as ``nanoseg export`` writes it (max_batch 1)."""
    return export_checkpoint_onnx(ckpt)


def with_metadata(graph: bytes, key: str, value: str) -> bytes:
    proto = onnx.load_from_string(graph)
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value
    return bytes(proto.SerializeToString())


def with_input_dims(graph: bytes, c: int, h: int, w: int) -> bytes:
    proto = onnx.load_from_string(graph)
    (image,) = [v for v in proto.graph.input if v.name == "image"]
    dims = image.type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value, dims[3].dim_value = c, h, w
    return bytes(proto.SerializeToString())


def refused(ckpt: Checkpoint, path: Path, data: bytes) -> str:
    path.write_bytes(data)
    with pytest.raises(EngineError) as info:
        engine_from_checkpoint(ckpt, "onnxruntime", threads=1, onnx_path=path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_the_exported_graph_itself_loads(ckpt: Checkpoint, graph: bytes, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(graph)
    eng = engine_from_checkpoint(ckpt, "onnxruntime", threads=1, onnx_path=tmp_path / "model.onnx")
    assert eng.max_batch == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["-1", "0", "many", ""])
def test_max_batch_below_one_is_refused(ckpt: Checkpoint, graph: bytes, tmp_path: Path, value: str) -> None:
    msg = refused(ckpt, tmp_path / "mb.onnx", with_metadata(graph, MAX_BATCH_KEY, value))
    assert f"{MAX_BATCH_KEY} is {value!r}, expected an integer >= 1" in msg


@pytest.mark.parametrize("value", ["-1", "0"])
def test_onnx_engine_refuses_max_batch_below_one(graph: bytes, tmp_path: Path, value: str) -> None:
    path = tmp_path / "mb.onnx"
    path.write_bytes(with_metadata(graph, MAX_BATCH_KEY, value))
    with pytest.raises(EngineError, match=rf"{path}: metadata {MAX_BATCH_KEY} is '{value}'"):
        OnnxEngine(str(path), threads=1)


@pytest.mark.parametrize(("shape", "name"), [((3, 512, 512), "three_channels"), ((1, 256, 256), "tile256")])
def test_input_shape_other_than_the_checkpoints_is_refused(ckpt: Checkpoint, graph: bytes, tmp_path: Path,
                                                           shape: tuple[int, int, int], name: str) -> None:
    msg = refused(ckpt, tmp_path / f"{name}.onnx", with_input_dims(graph, *shape))
    assert f"(C, H, W) {shape}" in msg and "(1, 512, 512)" in msg


def test_metadata_of_another_model_is_refused(ckpt: Checkpoint, graph: bytes, tmp_path: Path) -> None:
    other = with_metadata(graph, "nanoseg.model_config", '{"backbone": "resnet50", "in_channels": 1}')
    msg = refused(ckpt, tmp_path / "other.onnx", other)
    assert "backbone 'resnet50'" in msg


def test_input_spec_of_another_model_is_refused(ckpt: Checkpoint, graph: bytes, tmp_path: Path) -> None:
    other = with_metadata(graph, "nanoseg.input_spec", '{"pixel_size_nm": 4.0, "size": 512}')
    msg = refused(ckpt, tmp_path / "other.onnx", other)
    assert "nanoseg.input_spec" in msg and "4.0" in msg


@pytest.mark.parametrize(("make", "cause"), [
    (lambda g: g[: len(g) // 2], "not a readable ONNX graph, truncated or corrupt"),
    (lambda g: g[:1000], "not a readable ONNX graph, truncated or corrupt"),
    (lambda g: b"", r"empty file \(0 bytes\), not an ONNX graph"),
    (lambda g: b"\x00" * 64, "not a readable ONNX graph|has no input 'image'"),
])
def test_truncated_or_empty_file_is_refused_naming_the_cause(ckpt: Checkpoint, graph: bytes, tmp_path: Path,
                                                             make: Callable[[bytes], bytes], cause: str) -> None:
    msg = refused(ckpt, tmp_path / "broken.onnx", make(graph))
    assert "mask decoding" not in msg and re.search(cause, msg), msg


def test_malformed_mask_decoding_metadata_is_refused(ckpt: Checkpoint, graph: bytes, tmp_path: Path) -> None:
    msg = refused(ckpt, tmp_path / "dec.onnx", with_metadata(graph, METADATA_KEY, "{not json"))
    assert f"metadata {METADATA_KEY} is not a valid mask decoding" in msg
    msg = refused(ckpt, tmp_path / "dec.onnx", with_metadata(graph, METADATA_KEY, '{"tta": 3}'))
    assert "tta" in msg


def test_a_fifo_as_graph_is_refused_at_once(ckpt: Checkpoint, tmp_path: Path) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(EngineError, match="not a regular file"):
        engine_from_checkpoint(ckpt, "onnxruntime", threads=1, onnx_path=fifo)
