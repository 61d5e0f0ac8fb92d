"""The daemon end to end over real sockets: raw frames in, stored and published results out."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nanoseg.checkpoint import load_checkpoint
from nanoseg.control_client import control_request
from nanoseg_daemon.store import ResultReader, default_path
from tests.daemon.service_fixtures import (
    DOSE,
    Client,
    raw_header,
    start_service,
    transmission_frame,
)

FRAMES = [transmission_frame(11, i) for i in range(3)]


def metric(svc, name: str) -> float:  # type: ignore[no-untyped-def]
    assert svc.metrics_server is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_server.port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def send_frames(client: Client, run: str = "r1") -> None:
    for i, f in enumerate(FRAMES):
        client.send([raw_header(i, f.counts, run=run, pixel_size_nm=8.0, i0=DOSE), f.counts.tobytes()])


def test_raw_frames_are_analysed_stored_and_published(tmp_path: Path, trained_model_path: Path) -> None:
    svc = start_service(tmp_path, trained_model_path)
    client = Client(svc)
    try:
        send_frames(client)
        client.send([raw_header("bad", np.zeros((4, 4), np.uint16)), b"\x00" * 7])  # truncated buffer
        summaries = list(client.summaries(3))
        assert [s["seq_num"] for s in summaries] == [1, 2, 3]
        for s, f in zip(summaries, FRAMES):
            assert abs(s["count"] - f.n_wires) <= max(3, 0.35 * f.n_wires), (s["count"], f.n_wires)
        assert metric(svc, "nanoseg_frames_processed_total") == 3
        assert metric(svc, 'nanoseg_messages_rejected_total{reason="truncated_buffer"}') == 1 or \
            metric(svc, "nanoseg_messages_rejected_total") >= 1
        status = control_request(svc.control.address, {"command": "status"})
        assert status["ok"] and status["result"]["processed"] == 3
    finally:
        client.close()
        assert svc.stop()
    rows = ResultReader(default_path(tmp_path)).frames("raw:detector:r1")
    assert [r.seq_num for r in rows] == [1, 2, 3]


def test_restart_with_populated_store_never_duplicates(tmp_path: Path, trained_model_path: Path) -> None:
    for _attempt in range(2):
        svc = start_service(tmp_path, trained_model_path)
        client = Client(svc)
        try:
            send_frames(client)
            deadline = 60
            import time

            t0 = time.monotonic()
            while time.monotonic() - t0 < deadline:
                if metric(svc, "nanoseg_frames_processed_total") + metric(svc, 'nanoseg_frames_dropped_total{reason="duplicate"}') >= 3:
                    break
                time.sleep(0.2)
        finally:
            client.close()
            svc.stop()
    reader = ResultReader(default_path(tmp_path))
    assert reader.frame_count("raw:detector:r1") == 3


def test_reload_to_broken_model_keeps_serving(tmp_path: Path, trained_model_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(trained_model_path.read_bytes()[: 100_000])  # truncated file
    svc = start_service(tmp_path / "state", trained_model_path)
    try:
        before = svc.slot.current.version
        reply = control_request(svc.control.address, {"command": "reload_model", "path": str(broken)})
        assert not reply["ok"] and "still serving" in reply["error"]
        assert svc.slot.current.version == before
        assert metric(svc, 'nanoseg_model_reloads_total{result="failed"}') == 1
        bad = control_request(svc.control.address, {"command": "launch_rockets"})
        assert not bad["ok"] and "command" in bad["error"]
        ok = control_request(svc.control.address, {"command": "set", "score_threshold": 0.7})
        assert ok["ok"] and ok["result"]["postprocess"]["score_threshold"] == 0.7
        point = load_checkpoint(trained_model_path).operating_point  # the model's own, unless set
        assert ok["result"]["postprocess"]["mask_rescoring"] is (point is not None and point.mask_rescoring)
        off = control_request(svc.control.address, {"command": "set", "mask_rescoring": False})
        assert off["ok"] and off["result"]["postprocess"]["mask_rescoring"] is False
        bad_set = control_request(svc.control.address, {"command": "set", "mask_rescoring": "sometimes"})
        assert not bad_set["ok"] and "mask_rescoring" in bad_set["error"]
        good = control_request(svc.control.address, {"command": "reload_model", "path": str(trained_model_path)})
        assert good["ok"]
        assert good["result"]["postprocess"]["score_threshold"] == 0.7  # what the operator set survives a reload
        assert good["result"]["postprocess_configured"]["score_threshold"] == 0.7
        assert metric(svc, 'nanoseg_model_reloads_total{result="ok"}') == 1
        ready = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_server.port}/readyz", timeout=5)  # type: ignore[union-attr]
        assert ready.status == 200
    finally:
        svc.stop()


@pytest.mark.parametrize("policy", ["drop_oldest", "latest_only"])
def test_paused_queue_policies_drop_and_count(tmp_path: Path, trained_model_path: Path, policy: str) -> None:
    svc = start_service(tmp_path, trained_model_path, **{"queue.policy": policy, "queue.size": "2"})
    client = Client(svc)
    try:
        assert control_request(svc.control.address, {"command": "pause"})["ok"]
        small = np.full((64, 64), 1000, np.uint16)
        for i in range(6):
            client.send([raw_header(i, small, run="p", pixel_size_nm=8.0), small.tobytes()])
        import time

        t0 = time.monotonic()
        while metric(svc, "nanoseg_frames_received_total") < 6 and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        dropped = metric(svc, "nanoseg_frames_dropped_total")
        assert dropped == (4 if policy == "drop_oldest" else 5)
        assert control_request(svc.control.address, {"command": "resume"})["ok"]
        got = list(client.summaries(6 - int(dropped), timeout_s=60))
        assert len(got) == 6 - int(dropped)
        assert json.dumps(got)  # plain JSON
    finally:
        client.close()
        svc.stop()


def test_input_check_and_auto_pixel_size_reach_results_and_metrics(tmp_path: Path, trained_model_path: Path) -> None:
    """A TEM-like transmission frame sent with the SEM profile (dark background expected) is analysed,
    counted as an input mismatch and says so in its result; a profile with ``pixel_size_nm: auto``
    stores the pixel size the model's confidence chose (the frame is at the model's 8 nm, so
    near 8), once per run: a later frame of the run, another picture at half the size, keeps it."""
    auto = tmp_path / "auto.yaml"
    auto.write_text("name: auto_ptycho\nmode: optical_density\npixel_size_nm: auto\n")
    svc = start_service(tmp_path, trained_model_path)
    client = Client(svc)
    f = FRAMES[0]
    try:
        client.send([raw_header(0, f.counts, run="r2", profile="sem"), f.counts.tobytes()])
        client.send([raw_header(1, f.counts, run="r2", profile=str(auto), i0=DOSE), f.counts.tobytes()])
        half = np.ascontiguousarray(f.counts[::2, ::2])
        client.send([raw_header(2, half, run="r2", profile=str(auto), i0=DOSE), half.tobytes()])
        assert len(list(client.summaries(3))) == 3
        assert metric(svc, 'nanoseg_frames_input_mismatch_total{looks_like="transmission"}') == 1
    finally:
        client.close()
        assert svc.stop()
    rows = ResultReader(default_path(tmp_path)).frames("raw:detector:r2")
    sem, chosen, later = (r.metadata for r in rows)
    assert (sem["input_looks_like"], sem["input_used"], sem["input_mismatch"]) == ("transmission", "optical_density", True)
    assert chosen["input_mismatch"] is False and chosen["pixel_size_nm"] is None  # sizes stay in px
    # within an octave: the rule was within half of one on the 36 frames it was designed on; this
    # transmission frame of a few wires is read at 5.4 nm (0.57 octave)
    assert 4.0 < chosen["pixel_size_auto_nm"] < 16.0
    assert chosen["pixel_size_auto_method"] == "confidence" and chosen["pixel_size_auto_confidence"] > 0.5
    assert later["pixel_size_auto_nm"] == chosen["pixel_size_auto_nm"]  # the run's choice


def test_the_configured_edge_rule_summarises_published_and_stored_frames(tmp_path: Path,
                                                                        trained_model_path: Path) -> None:
    svc = start_service(tmp_path, trained_model_path, **{"statistics.edge_rule": "exclude",
                                                         "statistics.bootstrap_resamples": "200"})
    client = Client(svc)
    try:
        f = FRAMES[0]
        client.send([raw_header(0, f.counts, run="edge", pixel_size_nm=8.0, i0=DOSE), f.counts.tobytes()])
        (published,) = list(client.summaries(1))
    finally:
        client.close()
        assert svc.stop()
    (row,) = ResultReader(default_path(tmp_path)).frames("raw:detector:edge")
    for s in (published["summary"], row.summary):
        assert s["edge_rule"] == "exclude" and s["count"] > 0
        assert s["touching_edge"] > 0 and s["counted"] == s["count"] - s["touching_edge"]  # the rule counted


def test_statistics_in_worker_processes_give_the_same_summaries(tmp_path: Path, trained_model_path: Path) -> None:
    """``statistics.workers: 2``: the frames' summaries, over real sockets, are those of the
    daemon's own thread (the same model, frames and settings), and status lists the workers."""
    from nanoseg.postprocess import PostprocessConfig
    from nanoseg_daemon.contracts import FrameJob, FrameMetadata
    from nanoseg_daemon.model_slot import load_model
    from nanoseg_daemon.pipeline import ProfileBook, analyse_frame

    model = load_model(trained_model_path, "torch", "cpu", 2, PostprocessConfig())
    expected = [json.loads(json.dumps(analyse_frame(
        FrameJob("r1", str(i), i + 1, f.counts, 0.0, FrameMetadata(pixel_size_nm=8.0, i0=DOSE), 0.0),
        model, ProfileBook("ptychography")).summary.to_dict())) for i, f in enumerate(FRAMES)]
    svc = start_service(tmp_path, trained_model_path, **{"statistics.workers": 2})
    client = Client(svc)
    try:
        send_frames(client)
        summaries = list(client.summaries(3))
        status = control_request(svc.control.address, {"command": "status"})
        assert status["ok"] and len(status["result"]["statistics_workers"]) == 2
        deadline = time.monotonic() + 10  # the housekeeping sets the gauge once a second
        while metric(svc, "nanoseg_statistics_workers") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(svc, "nanoseg_statistics_workers") == 2
    finally:
        client.close()
        assert svc.stop()
    assert [s["seq_num"] for s in summaries] == [1, 2, 3]
    assert [s["summary"] for s in summaries] == expected
