"""The SQLite result store on real files: contents, idempotence, restart, write failures."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import threading

import numpy as np
import pytest

from nanoseg.masks import decode_rle
from nanoseg_daemon.contracts import FrameMetadata, RunStarted, RunStopped
from nanoseg_daemon.store import ResultReader, ResultStore, StoreError, default_path
from tests.daemon.results_fixtures import WIRES, frame_result


def _started(run_uid: str, t: float = 1_699_999_999.0) -> RunStarted:
    meta = FrameMetadata(pixel_size_nm=5.0, flat_field=np.ones((4, 4)), extra={"scan_id": 7})
    return RunStarted(run_uid, meta, {"uid": run_uid, "time": t, "scan_id": 7}, t)


@pytest.fixture
def store(tmp_path):
    s = ResultStore(default_path(tmp_path / "state"))
    yield s
    s.close()


def test_frames_and_particles_round_trip(store):
    store.add_run(_started("run-a"), "test-model-1")
    results = [frame_result("run-a", k) for k in (2, 1, 3)]  # stored out of order
    assert all(store.add_frame(r) for r in results)
    store.stop_run(RunStopped("run-a", "success", 1_700_000_010.0))

    (run,) = store.runs()
    assert (run.run_uid, run.frame_count, run.particle_count) == ("run-a", 3, 9)
    assert (run.exit_status, run.stopped_at, run.model_version) == ("success", 1_700_000_010.0, "test-model-1")
    assert run.metadata["extra"] == {"scan_id": 7} and run.metadata["flat_field_shape"] == [4, 4]

    frames = store.frames("run-a")
    assert [f.seq_num for f in frames] == [1, 2, 3]
    assert frames[0].summary["count"] == 3 and frames[2].invalid_pixels == {"nan": 0, "saturated": 3}
    assert frames[0].summary["stats"]["length_px"]["mean"] == pytest.approx(
        results[1].summary.stats["length_px"].mean
    )

    parts = store.particles("run-a")
    assert [(p["seq_num"], p["idx"]) for p in parts] == [(s, i) for s in (1, 2, 3) for i in range(3)]
    first = results[1]
    for p in parts[:3]:
        i = p["idx"]
        assert p["length_px"] == pytest.approx(WIRES[i][2], abs=1.0)
        assert p["width_px"] == pytest.approx(WIRES[i][3], abs=1.0)
        assert p["length_nm"] == pytest.approx(5.0 * p["length_px"])
        assert p["score"] == pytest.approx(float(first.instances.scores[i]))
        assert isinstance(p["area_px"], int) and p["area_px"] == first.instances.masks[i].sum()
        assert (p["box_x1"] - p["box_x0"]) == pytest.approx(first.instances.boxes[i][2] - first.instances.boxes[i][0])
        np.testing.assert_array_equal(decode_rle(p["mask_rle"]), first.instances.masks[i])


def test_duplicate_frame_is_refused_and_changes_nothing(store):
    r = frame_result("run-a", 1)
    assert store.add_frame(r) is True
    assert store.add_frame(r) is False
    assert store.frame_count("run-a") == 1 and len(store.particles("run-a")) == 3
    assert store.has_frame(r.frame_uid) and not store.has_frame("nope")


def test_restart_keeps_frames_and_never_duplicates(tmp_path):
    path = default_path(tmp_path)
    s = ResultStore(path)
    s.add_run(_started("run-a"), "m1")
    for k in (1, 2):
        s.add_frame(frame_result("run-a", k))
    s.close()

    s = ResultStore(path)  # the daemon restarts and the source replays frames 1..3
    added = [s.add_frame(frame_result("run-a", k)) for k in (1, 2, 3)]
    s.add_run(_started("run-a", t=1_700_000_100.0), "m2")  # a replayed start keeps the first time
    s.close()
    assert added == [False, False, True]

    reader = ResultReader(path)
    (run,) = reader.runs()
    assert run.frame_count == 3 and run.particle_count == 9
    assert run.started_at == 1_699_999_999.0 and run.model_version == "m2"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_disk_full_raises_store_error_and_keeps_earlier_rows(tmp_path):
    path = tmp_path / "r.sqlite3"
    s = ResultStore(path, max_bytes=16 * 4096)  # a tiny disk
    stored, err = [], None
    for k in range(1, 200):
        r = frame_result("run-a", k)
        try:
            s.add_frame(r)
        except StoreError as e:
            err, failed = e, r
            break
        stored.append(r.frame_uid)
    assert err is not None and err.reason == "disk_full", err
    assert not err.permanent  # the store's fault: a retry may succeed
    assert len(stored) >= 1
    assert not s.has_frame(failed.frame_uid)  # the transaction was rolled back whole
    assert s.frame_count("run-a") == len(stored)
    assert len(s.particles("run-a")) == 3 * len(stored)
    s.close()

    s = ResultStore(path)  # space freed: the caller's retry of the same result succeeds once
    assert s.add_frame(failed) is True and s.add_frame(failed) is False
    assert [f.frame_uid for f in s.frames("run-a")] == [*stored, failed.frame_uid]
    s.close()


def test_frames_before_start_and_stop_of_unknown_run(store):
    store.add_frame(frame_result("run-b", 1, n_wires=0, pixel_size_nm=None))
    (run,) = store.runs()
    assert run.metadata == {} and run.started_at == 1_700_000_001.0 and run.frame_count == 1
    assert run.particle_count == 0 and store.particles("run-b") == []
    stats = store.frames("run-b")[0].summary["stats"]
    assert set(stats["length_px"].values()) == {None} and "length_nm" not in stats
    store.add_run(_started("run-b"), "m1")
    store.stop_run(RunStopped("run-c", "abort", 5.0))
    runs = {r.run_uid: r for r in store.runs()}
    assert runs["run-b"].metadata["pixel_size_nm"] == 5.0 and runs["run-b"].started_at == 1_699_999_999.0
    assert (runs["run-c"].exit_status, runs["run-c"].frame_count) == ("abort", 0)


def test_nm_columns_are_null_without_pixel_size(store):
    store.add_frame(frame_result("run-a", 1, n_wires=2, pixel_size_nm=None))
    (p, _) = store.particles("run-a")
    assert p["length_nm"] is None and p["area_nm2"] is None and p["length_px"] == pytest.approx(40.0, abs=1)


def test_reads_from_another_thread_while_writing(store):
    store.add_frame(frame_result("run-a", 1))
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(ResultReader(store.path).frame_count("run-a")))
    t.start()
    t.join()
    assert seen == [1]


def test_schema_version_mismatch_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    ResultStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError) as info:
        ResultStore(path)
    assert info.value.reason == "schema_version"


def test_reader_of_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        ResultReader(tmp_path / "absent.sqlite3")


def test_images_in_the_start_document_are_not_copied_into_the_store(tmp_path):
    dark = np.full((512, 512), 100, np.uint16)
    s = ResultStore(default_path(tmp_path))
    start = {"uid": "big", "time": 1.0, "dark": dark, "nested": {"flat": dark.tolist()}, "scan_id": 3}
    s.add_run(RunStarted("big", FrameMetadata(dark_frame=dark), start, 1.0), "m@1")
    s.close()
    con = sqlite3.connect(default_path(tmp_path))
    (meta,) = con.execute("select metadata from runs where run_uid = 'big'").fetchone()
    con.close()
    assert len(meta) < 2000
    assert '"array_shape":[512,512]' in meta and '"scan_id":3' in meta


def test_open_runs_are_kept_until_their_stop(store, tmp_path):
    start = {"uid": "run-o", "time": 1.0, "dark": np.zeros((16, 16)), "scan_id": 3}
    desc = {"uid": "d1", "run_start": "run-o", "name": "primary", "data_keys": {}}
    store.run_opened(start)
    store.run_opened(start)  # a resumed run announces itself again: still one row
    store.descriptor_added("run-o", desc)
    store.descriptor_added("run-o", desc)
    store.descriptor_added("run-x", desc)  # not open: ignored
    store.add_frame(frame_result("run-o", 1))
    store.add_frame(frame_result("run-o", 2))
    store.analysis_opened("run-o", {"uid": "a1", "time": 2.0}, "ad1")
    (o,) = ResultReader(store.path).open_runs()
    assert (o.run_uid, o.frames, o.last_seq_num, o.analysis_descriptor_uid) == ("run-o", 2, 2, "ad1")
    assert o.start_doc["dark"] == [[0.0] * 16] * 16 and o.start_doc["scan_id"] == 3  # whole, to resume
    assert o.descriptors == [desc] and o.analysis_start == {"uid": "a1", "time": 2.0}
    store.stop_run(RunStopped("run-o", "abort", 5.0, reason="nothing came after the restart"))
    assert store.open_runs() == []
    (run,) = store.runs()
    assert run.exit_status == "abort" and run.metadata["stop_reason"] == "nothing came after the restart"


def test_an_item_sqlite_can_never_take_is_refused_as_permanent(store: ResultStore) -> None:
    """A NaN time (NOT NULL), an integer beyond 64 bits, a string that is not UTF-8: reason
    ``rejected``, ``permanent`` (a retry cannot help), nothing of it stored, the store usable."""
    good = frame_result("run-a", 1)
    with pytest.raises(StoreError) as info:
        store.add_run(dataclasses.replace(_started("run-nan"), time=math.nan), "m1")
    assert info.value.reason == "rejected" and info.value.permanent, info.value
    bad = [dataclasses.replace(good, frame_uid="nan-time", timestamp=math.nan),
           dataclasses.replace(good, frame_uid="big-seq", seq_num=2**70),
           dataclasses.replace(good, frame_uid="bad-\ud800")]
    for frame in bad:
        with pytest.raises(StoreError) as info:
            store.add_frame(frame)
        assert info.value.reason == "rejected" and info.value.permanent, info.value
    with pytest.raises(StoreError) as info:  # in a group: the group's transaction, whole
        store.add_frames([good, bad[0]])
    assert info.value.permanent and not store.has_frame(good.frame_uid)
    assert store.runs() == [] and store.open_runs() == []
    assert store.add_frame(good) is True and store.frame_count("run-a") == 1


def test_a_started_run_is_listed_open_until_its_stop_and_runs_left_open_without_start_are_found(
        store: ResultStore) -> None:
    raw = RunStarted("raw:det:scan", FrameMetadata(), {"uid": "raw:det:scan", "nanoseg_input": "raw"}, 1.0)
    store.add_run(raw, "m1")
    store.add_frame(frame_result("raw:det:scan", 1))
    store.analysis_opened("raw:det:scan", {"uid": "a1", "time": 2.0}, "ad1")  # the raw run's analysis, journalled
    store.run_opened({"uid": "blue", "time": 1.0, "dark": [[1, 2], [3, 4]]})  # bluesky ingest's whole start
    store.add_run(_started("blue"), "m1")  # ingest's record stands
    store.add_frame(frame_result("no-start", 1))  # a run whose start was never stored
    store.add_frame(frame_result("stopped", 1))
    store.stop_run(RunStopped("stopped", "success", 3.0))
    opened = {o.run_uid: o for o in store.open_runs()}
    assert set(opened) == {"raw:det:scan", "blue"}
    assert opened["raw:det:scan"].start_doc["nanoseg_input"] == "raw" and opened["raw:det:scan"].frames == 1
    assert opened["raw:det:scan"].analysis_start == {"uid": "a1", "time": 2.0}
    assert opened["blue"].start_doc["dark"] == [[1, 2], [3, 4]]
    assert store.unlisted_open_runs() == ["no-start"]
    store.stop_run(RunStopped("raw:det:scan", "abort", 4.0, reason="open when the daemon stopped"))
    store.stop_run(RunStopped("no-start", "abort", 4.0))
    assert [o.run_uid for o in store.open_runs()] == ["blue"] and store.unlisted_open_runs() == []
