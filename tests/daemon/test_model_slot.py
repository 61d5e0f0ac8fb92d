"""The serving model's post-processing: the model's operating point under the configured fields."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.model_slot import ModelSlot, load_model
from nanoseg.checkpoint import load_checkpoint, save_checkpoint
from nanoseg.engines import onnx_engine
from nanoseg.export import export_checkpoint_onnx
from nanoseg.postprocess import PostprocessConfig
from nanoseg_training.quantize import quantize_int8
from tests.daemon.service_fixtures import start_service


def thresholds(slot: ModelSlot) -> tuple[float, float]:
    post = slot.current.segmenter.post
    return post.score_threshold, post.mask_threshold


def test_reload_brings_the_new_models_point_and_keeps_what_was_configured(trained_model_path: Path,
                                                                          tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained_model_path)
    with_point = tmp_path / "with_point.pt"
    without = tmp_path / "without.pt"
    save_checkpoint(replace(ckpt, meta={**ckpt.meta, "operating_point": {"score_threshold": 0.3, "mask_threshold": 0.4}}),
                    with_point, half=True)
    save_checkpoint(replace(ckpt, meta={k: v for k, v in ckpt.meta.items() if k != "operating_point"}), without, half=True)

    configured = PostprocessConfig.model_validate({"min_area_px": 30})
    slot = ModelSlot(load_model(with_point, "torch", "cpu", 1, configured), configured)
    assert thresholds(slot) == (0.3, 0.4) and slot.current.segmenter.post.min_area_px == 30
    slot.reload(without, "torch", "cpu", 1)
    assert thresholds(slot) == (0.5, 0.5)  # no point: the defaults
    slot.reload(with_point, "torch", "cpu", 1)
    assert thresholds(slot) == (0.3, 0.4)

    assert slot.set_postprocess({"score_threshold": 0.7}).score_threshold == 0.7  # the operator's control "set"
    assert thresholds(slot) == (0.7, 0.4)
    slot.reload(without, "torch", "cpu", 1)
    assert thresholds(slot) == (0.7, 0.5)  # what the operator set survives the reload
    assert slot.configured.model_dump(exclude_unset=True) == {"min_area_px": 30, "score_threshold": 0.7}

    explicit = PostprocessConfig.model_validate({"mask_threshold": 0.6})
    slot = ModelSlot(load_model(with_point, "torch", "cpu", 1, explicit), explicit)
    assert thresholds(slot) == (0.3, 0.6)


def test_mask_rescoring_follows_the_models_point_unless_the_operator_sets_it(trained_model_path: Path,
                                                                             tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained_model_path)
    rescored, plain = tmp_path / "rescored.pt", tmp_path / "plain.pt"
    point = {"score_threshold": 0.4, "mask_threshold": 0.5, "mask_rescoring": True}
    save_checkpoint(replace(ckpt, meta={**ckpt.meta, "operating_point": point}), rescored, half=True)
    save_checkpoint(replace(ckpt, meta={k: v for k, v in ckpt.meta.items() if k != "operating_point"}), plain, half=True)

    slot = ModelSlot(load_model(plain, "torch", "cpu", 1, PostprocessConfig()), PostprocessConfig())
    assert slot.current.segmenter.post.mask_rescoring is False
    slot.reload(rescored, "torch", "cpu", 1)
    assert slot.current.segmenter.post.mask_rescoring is True and thresholds(slot) == (0.4, 0.5)
    assert slot.set_postprocess({"mask_rescoring": False}).mask_rescoring is False  # control "set"
    slot.reload(rescored, "torch", "cpu", 1)
    assert slot.current.segmenter.post.mask_rescoring is False  # the operator's choice survives


def test_the_models_mask_decoding_serves_unless_the_config_sets_the_view_count(trained_model_path: Path,
                                                                               tmp_path: Path) -> None:
    """A model's decoding (margin, TTA) comes with it; ``model.mask_tta`` trades it for speed,
    and a reload keeps what the config asked for."""
    from nanoseg.mask_decoding import MaskDecoding

    ckpt = load_checkpoint(trained_model_path)
    point = {"score_threshold": 0.4, "mask_threshold": 0.5, "mask_decoding": {"margin_px": 1.0, "tta": 2}}
    path = save_checkpoint(replace(ckpt, meta={**ckpt.meta, "operating_point": point}), tmp_path / "m.pt", half=True)
    own = load_model(path, "onnxruntime", "cpu", 1, PostprocessConfig())
    assert own.segmenter.engine.mask_decoding == MaskDecoding(margin_px=1.0, tta=2)
    assert own.segmenter.mask_margin_px == 1.0
    slot = ModelSlot(load_model(path, "torch", "cpu", 1, PostprocessConfig(), mask_tta=1))
    assert slot.current.segmenter.engine.mask_decoding == MaskDecoding(margin_px=1.0, tta=1)
    slot.reload(path, "torch", "cpu", 1, mask_tta=1)
    assert slot.current.segmenter.engine.mask_decoding.tta == 1


def test_max_detections_raises_or_lowers_the_models_cap(trained_model_path: Path, paper_samples: list) -> None:
    """``model.max_detections`` replaces the cap of detections per model input (50 in the shipped
    model): a frame of many wires gives at most that many; the config refuses it where the graph
    is fixed already (an exported ONNX file, triton)."""
    import numpy as np
    import pytest

    from nanoseg.config_io import ConfigError, parse_config
    from nanoseg_daemon.config import ModelSection

    gray, masks = max(paper_samples, key=lambda s: len(s[1]))
    assert len(masks) > 4
    few = load_model(trained_model_path, "torch", "cpu", 1, PostprocessConfig(score_threshold=0.05), max_detections=3)
    many = load_model(trained_model_path, "torch", "cpu", 1, PostprocessConfig(score_threshold=0.05), max_detections=200)
    tile = np.asarray(gray, np.float32)[None]
    assert len(few.segmenter.infer_tiles(tile)[0]) <= 3 < len(many.segmenter.infer_tiles(tile)[0])
    with pytest.raises(ConfigError, match="max_detections"):
        parse_config({"engine": "onnxruntime", "onnx_path": "m.onnx", "max_detections": 100}, ModelSection)


def test_instances_are_separate_engines_lent_one_caller_at_a_time(trained_model_path: Path) -> None:
    slot = ModelSlot(load_model(trained_model_path, "onnxruntime", "cpu", 1, PostprocessConfig(), instances=2))
    model = slot.current
    assert model.instances == 2
    engines = [model.segmenter.engine, model.replicas[0].engine]
    assert engines[0] is not engines[1] and engines[0].session is not engines[1].session  # type: ignore[attr-defined]

    held: list[object] = []

    def third() -> None:
        with model.instance() as c:
            held.append(c)

    with model.instance() as a, model.instance() as b:
        assert {id(a.engine), id(b.engine)} == {id(e) for e in engines}
        waiter = threading.Thread(target=third)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not held  # both lent: a third caller waits
    waiter.join(5)
    assert len(held) == 1  # one came back; it got it

    # the operator's "set" keeps the engines (and their lending) and changes every instance's point
    slot.set_postprocess({"score_threshold": 0.65})
    assert slot.current.instances == 2
    assert [s.post.score_threshold for s in slot.current.segmenters] == [0.65, 0.65]
    assert slot.current.replicas[0].engine is engines[1]
    slot.reload(trained_model_path, "onnxruntime", "cpu", 1, instances=3)  # a reload brings its own instances
    assert slot.current.instances == 3 and slot.current.segmenter.post.score_threshold == 0.65


def test_an_int8_graph_is_served_and_a_cpu_without_vnni_is_named(trained_model_path: Path, tmp_path: Path,
                                                                  paper_samples: list,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon serves an int8 graph (its warm-up on a blank input failed before the clipping
    fix) and logs ``int8_saturation_risk`` where the CPU has no VNNI (flags set for the test)."""
    fp32 = export_checkpoint_onnx(load_checkpoint(trained_model_path))
    int8 = tmp_path / "model.int8.onnx"
    int8.write_bytes(quantize_int8(fp32, (gray[None, None] for gray, _ in paper_samples[:2])))
    monkeypatch.setattr(onnx_engine, "_cpu_flags", lambda: {"sse4_1", "avx2"})
    events: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: events.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("nanoseg.daemon").addHandler(handler)
    try:
        svc = start_service(tmp_path / "state", trained_model_path, **{
            "model.engine": "onnxruntime", "model.onnx_path": str(int8), "model.threads": 1})
        svc.stop()
    finally:
        logging.getLogger("nanoseg.daemon").removeHandler(handler)
    assert svc.slot.current.segmenter.engine.precision == "int8"  # type: ignore[attr-defined]
    assert "int8_saturation_risk" in events
