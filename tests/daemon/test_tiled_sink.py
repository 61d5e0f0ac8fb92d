"""Sink tiled against a real ``tiled serve``: the daemon writes, tiled's client reads back what the store holds."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nanoseg.config_io import ConfigError
from nanoseg.masks import decode_rle
from nanoseg_daemon.config import load_daemon_config
from nanoseg_daemon.contracts import FrameMetadata, RunStarted
from nanoseg_daemon.logs import LOGGER
from nanoseg_daemon.service import Service
from nanoseg_daemon.sinks import SinkError
from nanoseg_daemon.store import ResultReader, default_path
from nanoseg_daemon.tiled_sink import TiledSink, analysis_runs
from nanoseg_sim.demo import free_ports
from tests.daemon.service_fixtures import (
    DOSE,
    Client,
    raw_header,
    service_overrides,
    transmission_frame,
)
from tests.daemon.tiled_fixtures import API_KEY, tiled_serve

tiled_client = pytest.importorskip("tiled.client", reason="tiled not installed (pip install -e '.[dev]')")

FRAMES = [transmission_frame(11, i) for i in range(2)]


def store_labels(particles: list[dict], seq_num: int, shape: tuple[int, int]) -> np.ndarray:
    """The label image the store's masks give: instance idx -> idx + 1, the later one on overlaps."""
    out = np.zeros(shape, np.uint16)
    for p in sorted((p for p in particles if p["seq_num"] == seq_num), key=lambda p: p["idx"]):
        out[decode_rle(p["mask_rle"]).astype(bool)] = p["idx"] + 1
    return out


def test_daemon_results_round_trip_through_tiled(tmp_path: Path, trained_model_path: Path, tiled_url: str) -> None:
    overrides = service_overrides(tmp_path, trained_model_path, **{"tiled.uri": tiled_url, "tiled.path": "[analysis]"})
    # the key from the environment, as a deployment passes it
    cfg = load_daemon_config(None, overrides, environ={"NANOSEG__TILED__API_KEY": API_KEY})
    assert cfg.sink_names == ["store", "bluesky", "summary", "tiled"]
    svc = Service(cfg)
    svc.start()
    client = Client(svc)
    try:
        for i, f in enumerate(FRAMES):
            client.send([raw_header(i, f.counts, run="r1", pixel_size_nm=8.0, i0=DOSE), f.counts.tobytes()])
        assert len(list(client.summaries(len(FRAMES)))) == len(FRAMES)
        client.send([json.dumps({"run": "r1", "timestamp": time.time(), "end_of_run": True}).encode(), b""])
        deadline = time.monotonic() + 30
        while svc.sinks.open_runs and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not svc.sinks.open_runs
    finally:
        client.close()
        assert svc.stop()
    assert not any(k[0] == "tiled" for k in _sink_errors(svc))

    run_uid = "raw:detector:r1"
    reader = ResultReader(default_path(tmp_path))
    frames, particles = reader.frames(run_uid), reader.particles(run_uid)
    assert sum(f.count for f in frames) > 0

    catalog = tiled_client.from_uri(tiled_url, api_key=API_KEY)["analysis"]
    (key,) = list(catalog)
    assert analysis_runs(catalog, run_uid) == [key] and analysis_runs(catalog, "raw:detector:other") == []
    run = catalog[key]
    start, stop = run.metadata["start"], run.metadata["stop"]
    assert start["raw_run_uid"] == run_uid and start["uid"] == key
    assert start["plan_name"] == "nanoseg_analysis" and start["model_version"] == frames[0].model_version
    assert stop["exit_status"] == "success" and stop["num_frames"] == len(FRAMES)
    assert sorted(run["labels"]) == sorted(run["particles"]) == ["000001", "000002"]
    for rec, f in zip(frames, FRAMES):
        node = run["labels"][f"{rec.seq_num:06d}"]
        labels = node.read()
        assert labels.dtype == np.uint16 and labels.shape == f.counts.shape
        assert node.metadata["frame_uid"] == rec.frame_uid
        assert node.metadata["summary"]["count"] == rec.count
        np.testing.assert_array_equal(labels, store_labels(particles, rec.seq_num, f.counts.shape))
        table = run["particles"][f"{rec.seq_num:06d}"].read()
        mine = [p for p in particles if p["seq_num"] == rec.seq_num]
        assert len(table) == rec.count == int(labels.max())
        assert list(table["label"]) == [p["idx"] + 1 for p in mine]
        np.testing.assert_array_equal(table["area_px"].to_numpy(), [p["area_px"] for p in mine])
        np.testing.assert_allclose(table["score"].to_numpy(), [p["score"] for p in mine])
        np.testing.assert_allclose(table["length_px"].to_numpy(), [p["length_px"] for p in mine], equal_nan=True)


def _sink_errors(svc: Service) -> dict[tuple[str, ...], float]:
    out = {}
    for metric in svc.metrics.sink_errors.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out[(s.labels["sink"], s.labels["reason"])] = s.value
    return out


def test_unreachable_tiled_is_a_named_sink_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiled's own setting (env TILED_RETRY_ATTEMPTS, read at import): one try, not 10 with backoff
    monkeypatch.setattr("tiled.client.utils.TILED_RETRY_ATTEMPTS", 1)

    port = free_ports(1)[0]  # nothing listens there
    cfg = load_daemon_config(None, {"tiled.uri": f"http://127.0.0.1:{port}", "tiled.timeout_s": "2"}, environ={})
    assert cfg.tiled is not None
    sink = TiledSink(cfg.tiled, lambda: ("v", {}))
    assert sink.durable is False
    with pytest.raises(SinkError) as err:
        sink.open_run(RunStarted("r", FrameMetadata(), {}, time.time()))
    assert err.value.reason == "tiled_unreachable"
    with pytest.raises(SinkError) as err:  # within retry_after_s: counted without trying
        sink.open_run(RunStarted("r2", FrameMetadata(), {}, time.time()))
    assert err.value.reason == "tiled_unreachable" and "not tried" in err.value.detail


def test_wrong_api_key_is_rejected(tiled_url: str) -> None:
    cfg = load_daemon_config(None, {"tiled.uri": tiled_url, "tiled.api_key": "wrong"}, environ={})
    assert cfg.tiled is not None
    with pytest.raises(SinkError) as err:
        TiledSink(cfg.tiled, lambda: ("v", {})).open_run(RunStarted("r", FrameMetadata(), {}, time.time()))
    assert err.value.reason == "tiled_rejected"


def test_sink_tiled_needs_its_section() -> None:
    with pytest.raises(ConfigError, match="tiled"):
        load_daemon_config(None, {"sinks": "[store, tiled]"}, environ={})
    with pytest.raises(ConfigError, match="uri"):
        load_daemon_config(None, {"tiled.api_key": "k"}, environ={})


def test_the_stop_in_tiled_carries_exit_status_and_reason_as_the_bluesky_stop(tiled_url: str) -> None:
    from nanoseg_daemon.contracts import RunStopped

    cfg = load_daemon_config(None, {"tiled.uri": tiled_url, "tiled.api_key": API_KEY, "tiled.path": "[stops]"},
                             environ={})
    assert cfg.tiled is not None
    sink = TiledSink(cfg.tiled, lambda: ("v", {}))
    for run in ("refused", "given_up"):
        sink.open_run(RunStarted(run, FrameMetadata(), {}, time.time()))
    sink.close_run(RunStopped("refused", "success", time.time(), {"shape_mismatch": 2}))
    sink.close_run(RunStopped("given_up", "abort", time.time(), reason="open when the daemon stopped"))
    catalog = tiled_client.from_uri(tiled_url, api_key=API_KEY)["stops"]
    stops = {node.metadata["start"]["raw_run_uid"]: node.metadata["stop"] for node in catalog.values()}
    assert (stops["refused"]["exit_status"], stops["refused"]["reason"]) == ("fail", "no frame analysed (shape_mismatch 2)")
    assert stops["refused"]["losses"] == {"shape_mismatch": 2} and stops["refused"]["num_frames"] == 0
    assert (stops["given_up"]["exit_status"], stops["given_up"]["reason"]) == ("abort", "open when the daemon stopped")


@contextlib.contextmanager
def daemon_log_records() -> Iterator[list[logging.LogRecord]]:
    """The records of ``nanoseg_daemon.logs.log`` while in the block (on its own logger, so a
    ``setup_logging`` that stopped propagation elsewhere does not hide them)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, level = Keep(logging.DEBUG), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


def test_a_tiled_server_restarted_with_a_fresh_catalog_gets_the_open_run_again(tmp_path: Path) -> None:
    pytest.importorskip("tiled.server", reason="tiled[server] not installed (pip install -e '.[dev]')")
    from nanoseg_daemon.contracts import RunStopped
    from tests.daemon.test_sinks import result

    port = free_ports(1)[0]
    cfg = load_daemon_config(None, {"tiled.uri": f"http://127.0.0.1:{port}", "tiled.api_key": API_KEY,
                                    "tiled.path": "[analysis]", "tiled.timeout_s": "20"}, environ={})
    assert cfg.tiled is not None
    sink = TiledSink(cfg.tiled, lambda: ("v", {"p": 1}))
    with daemon_log_records() as records:
        with tiled_serve(tmp_path, port=port) as url:
            sink.open_run(RunStarted("r", FrameMetadata(), {}, time.time()))
            assert sink.write_frame(result("r", 1), [])
            first = tiled_client.from_uri(url, api_key=API_KEY)["analysis"]
            (key,) = list(first)
            start = first[key].metadata["start"]
        with tiled_serve(tmp_path, port=port) as url:  # restarted, its catalog lost
            assert list(tiled_client.from_uri(url, api_key=API_KEY)) == []
            for seq in (2, 3):
                assert sink.write_frame(result("r", seq), [])
            sink.close_run(RunStopped("r", "success", time.time()))
            catalog = tiled_client.from_uri(url, api_key=API_KEY)["analysis"]
            assert list(catalog) == [key]  # the same analysis run, made again
            run = catalog[key]
            assert run.metadata["start"] == start
            note = run.metadata["recreated"]
            assert note["frames_missing"] == 1 and "store" in note["detail"]
            assert sorted(run["labels"]) == sorted(run["particles"]) == ["000002", "000003"]
            assert run["labels"]["000003"].read().shape == (32, 32)
            stop = run.metadata["stop"]
            assert stop["exit_status"] == "success" and stop["num_frames"] == 3
    recreated = [r for r in records if r.getMessage() == "tiled_run_recreated"]
    assert len(recreated) == 1 and recreated[0].levelno == logging.WARNING
    assert recreated[0].fields["run"] == "r" and recreated[0].fields["analysis"] == key  # type: ignore[attr-defined]
    # and a run started after the restart makes the container path again
    with tiled_serve(tmp_path, port=port) as url:
        sink.open_run(RunStarted("r2", FrameMetadata(), {}, time.time()))
        assert sink.write_frame(result("r2", 1), [])
        sink.close_run(RunStopped("r2", "success", time.time()))
        (key2,) = list(tiled_client.from_uri(url, api_key=API_KEY)["analysis"])
        assert tiled_client.from_uri(url, api_key=API_KEY)["analysis"][key2].metadata["stop"]["num_frames"] == 1
