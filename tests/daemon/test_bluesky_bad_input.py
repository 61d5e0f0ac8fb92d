"""daemon/bluesky_ingest.py against bad values in otherwise well-formed documents: times that are
not finite numbers, stream datums that claim absurd row ranges, event pages with ragged columns.
Each is refused under a named reason, never counted as internal_error, never passed downstream
(a NaN time jams the store), and never costs the ingest thread work per claimed row."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import msgpack
import msgpack_numpy
import numpy as np
import pytest
from bluesky.callbacks.zmq import Publisher
from event_model import compose_run, pack_event_page

from nanoseg_daemon import bluesky_ingest
from nanoseg_daemon.bluesky_ingest import BlueskyRouter
from nanoseg_daemon.ingest_config import BlueskyIngestConfig, IngestConfig
from nanoseg_daemon.stream_readers import HDF5StreamReader
from nanoseg_daemon.zmq_ingest import ZmqIngest
from tests.daemon.ingest_fixtures import (
    RecordingSink,
    start_proxy,
    test_frames,
    wait_until_connected,
)

H, W = 24, 32
BAD_TIMES: list[Any] = [math.nan, math.inf, -math.inf, 10**400, "noon"]
BAD_IDS = ["nan", "inf", "-inf", "10**400", "string"]


def image_key(shape: tuple[int, ...] = (H, W), **extra: Any) -> dict[str, Any]:
    return {"dtype": "array", "shape": list(shape), "source": "sim", **extra}


def open_run(router: BlueskyRouter, shape: tuple[int, ...] = (H, W)) -> tuple[Any, Any]:
    run = compose_run()
    router("start", run.start_doc)
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key(shape),
                                                             "x": {"dtype": "number", "shape": [], "source": "s"}})
    router("descriptor", desc.descriptor_doc)
    return run, desc


def bad_details(sink: RecordingSink) -> list[str]:
    return [d for r, d in sink.rejections if r == "bad_document"]


@pytest.mark.parametrize("bad", BAD_TIMES, ids=BAD_IDS)
def test_start_and_stop_whose_time_is_not_a_finite_number_are_bad_documents(bad: Any) -> None:
    sink = RecordingSink()
    router = BlueskyRouter(sink, BlueskyIngestConfig(early_documents_s=0))
    run = compose_run()
    router("start", {**run.start_doc, "time": bad})
    assert sink.reasons == ["bad_document"] and not sink.started and router.open_runs == []
    assert f"start {run.start_doc['uid']}: time" in sink.rejections[0][1]
    if bad == 10**400:
        assert "an integer of about 400 digits" in sink.rejections[0][1]
    sink.clear()
    router("start", run.start_doc)
    stop = run.compose_stop()
    before = time.time()
    router("stop", {**stop, "time": bad})
    assert sink.reasons == ["bad_document"] and f"stop {stop['uid']}: time" in sink.rejections[0][1]
    # the run stops all the same (no second stop will come), at the time the stop came, saying why
    assert [s.run_uid for s in sink.stopped] == [run.start_doc["uid"]] and router.open_runs == []
    got = sink.stopped[0]
    assert before <= got.time <= time.time() and got.rejected == {"bad_document": 1}
    assert got.exit_status == "success" and f"stop {stop['uid']}: time" in got.reason
    assert "stopped at the time it came" in got.reason
    router("stop", stop)  # a second stop for the stopped run is refused, not a second close
    assert sink.reasons[-1] == "run_closed" and len(sink.stopped) == 1


def test_a_stop_without_time_or_uid_still_stops_its_run() -> None:
    sink = RecordingSink()
    router = BlueskyRouter(sink, BlueskyIngestConfig(early_documents_s=0))
    run, _ = open_run(router)
    stop = run.compose_stop()
    del stop["time"], stop["uid"]
    router("stop", stop)
    assert sink.reasons == ["bad_document"] and "stop None: time is not a number: None" in sink.rejections[0][1]
    assert [s.run_uid for s in sink.stopped] == [run.start_doc["uid"]] and router.open_runs == []


@pytest.mark.parametrize("bad", BAD_TIMES, ids=BAD_IDS)
def test_events_whose_time_or_image_timestamp_is_not_finite_are_refused(bad: Any) -> None:
    sink = RecordingSink()
    router = BlueskyRouter(sink)
    run, desc = open_run(router)
    frames = test_frames(4)
    bad_time = desc.compose_event(data={"img": frames[0], "x": 1.0}, timestamps={"img": 1.0, "x": 1.0})
    bad_time["time"] = bad
    bad_stamp = desc.compose_event(data={"img": frames[1], "x": 1.0}, timestamps={"img": bad, "x": 1.0},
                                   validate=False)
    good = desc.compose_event(data={"img": frames[2], "x": 1.0}, timestamps={"img": 2.0, "x": 1.0})
    for ev in (bad_time, bad_stamp, good):
        router("event", ev)
    assert sink.reasons == ["bad_document", "bad_document"]
    assert f"event {bad_time['uid']}: time" in sink.rejections[0][1]
    assert f"event {bad_stamp['uid']}: timestamps['img']" in sink.rejections[1][1]
    assert [(j.frame_uid, j.timestamp) for j in sink.frames] == [(good["uid"], 2.0)]
    # in an event page the other events go on
    sink.clear()
    events = [desc.compose_event(data={"img": frames[k], "x": 1.0}, timestamps={"img": 5.0 + k, "x": 1.0})
              for k in range(3)]
    page = pack_event_page(*events)
    page["timestamps"]["img"][1] = bad
    router("event_page", page)
    assert sink.reasons == ["bad_document"] and "timestamps['img']" in sink.rejections[0][1]
    assert [j.frame_uid for j in sink.frames] == [events[0]["uid"], events[2]["uid"]]
    router("stop", run.compose_stop())
    assert sink.stopped[0].rejected == {"bad_document": 3}


def test_an_event_page_with_columns_of_different_lengths_is_a_bad_document() -> None:
    sink = RecordingSink()
    router = BlueskyRouter(sink)
    run, desc = open_run(router)
    frames = test_frames(3)
    events = [desc.compose_event(data={"img": frames[k], "x": float(k)}, timestamps={"img": 1.0, "x": 1.0})
              for k in range(3)]
    page = pack_event_page(*events)
    page["data"]["x"] = page["data"]["x"][:1]
    page["timestamps"]["x"] = page["timestamps"]["x"][:1]
    router("event_page", page)
    assert sink.reasons == ["bad_document"] and not sink.frames  # never missing_image
    detail = sink.rejections[0][1]
    assert "uid 3" in detail and "data['x'] 1" in detail and "timestamps['x'] 1" in detail
    assert "img" not in detail  # the columns of the right length are not named
    page = pack_event_page(*events)
    page["seq_num"] = page["seq_num"][:2]
    router("event_page", page)
    assert sink.reasons == ["bad_document"] * 2 and "seq_num 2" in sink.rejections[1][1]
    router("event_page", pack_event_page(*events))  # the whole page, resent well formed
    assert [j.frame_uid for j in sink.frames] == [e["uid"] for e in events]
    router("stop", run.compose_stop())
    assert sink.stopped[0].rejected == {"bad_document": 2}  # counted against the run


def stream_run(router: BlueskyRouter, uri: str, mimetype: str = "application/x-hdf5") -> tuple[Any, Any, Any]:
    """A started run whose image key is streamed from ``uri`` (dataset /data), and its resource."""
    run = compose_run()
    router("start", run.start_doc)
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key((1, 8, 8), external="STREAM:")})
    router("descriptor", desc.descriptor_doc)
    res = run.compose_stream_resource(mimetype=mimetype, uri=uri, data_key="img", parameters={"dataset": "/data"})
    router("stream_resource", res.stream_resource_doc)
    return run, desc, res


def stream_datum(res: Any, desc: Any, start: int, stop: int, seq_start: Any, seq_stop: Any) -> dict[str, Any]:
    """A stream datum for rows ``start:stop``, with any seq_nums (event-model's checks bypassed)."""
    datum = dict(res.compose_stream_datum(indices={"start": start, "stop": stop},
                                          seq_nums={"start": 0, "stop": 0}, descriptor=desc.descriptor_doc))
    return {**datum, "seq_nums": {"start": seq_start, "stop": seq_stop}}


def test_a_stream_datum_that_cannot_be_read_is_counted_per_row_in_one_call(tmp_path: Path) -> None:
    """Every row lost is counted (the run's stop says how many), with one log line, at once:
    not one rejection call per row (10**9 claimed rows took the ingest thread for hours)."""
    sink = RecordingSink()
    router = BlueskyRouter(sink, BlueskyIngestConfig(stream_wait_s=0.05, early_documents_s=0))
    run, desc, res = stream_run(router, f"file://localhost{tmp_path / 'never.h5'}")
    t0 = time.monotonic()
    router("stream_datum", stream_datum(res, desc, 0, 50_000, 1, 50_001))
    assert sink.reasons == ["fill_failed"] * 50_000 and sink.logged == ["fill_failed"]
    assert "50000 rows" in sink.rejections[0][1] and "never.h5" in sink.rejections[0][1]
    assert time.monotonic() - t0 < 5.0
    router("stop", run.compose_stop())
    assert sink.stopped[0].rejected == {"fill_failed": 50_000} and not sink.frames


def h5_stream(tmp_path: Path, frames: np.ndarray, **config: Any) -> tuple[RecordingSink, BlueskyRouter, Any, Any, Any]:
    """``frames`` in a real HDF5 file, a router with ``config`` (no wait for rows by default), and
    a run whose stream resource is that file: (sink, router, run, descriptor, resource)."""
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=frames)
    sink = RecordingSink()
    router = BlueskyRouter(sink, BlueskyIngestConfig(**{"stream_wait_s": 0.0, **config}))
    return (sink, router, *stream_run(router, f"file://localhost{path}"))


def test_rows_never_written_are_counted_each_and_logged_once(tmp_path: Path) -> None:
    sink, router, _run, desc, res = h5_stream(tmp_path, test_frames(2, (8, 8)))
    router("stream_datum", stream_datum(res, desc, 0, 5, 1, 6))
    assert len(sink.frames) == 2 and sink.reasons == ["frames_not_written"] * 3
    assert sink.logged == ["frames_not_written"] and "rows 2:5" in sink.rejections[0][1]


def test_a_large_stream_datum_is_read_a_part_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its rows come from the file in reads of about STREAM_READ_BYTES, never all at once, and
    every frame comes out once, in order (before: one read of the whole datum into memory)."""
    frames = test_frames(40, (8, 8))
    sink, router, _run, desc, res = h5_stream(tmp_path, frames)
    monkeypatch.setattr(bluesky_ingest, "STREAM_READ_BYTES", 10 * frames[0].nbytes)  # ten rows a read
    reads: list[tuple[int, int]] = []
    original = HDF5StreamReader.read

    def counted(self: HDF5StreamReader, start: int, stop: int) -> np.ndarray:
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(HDF5StreamReader, "read", counted)
    router("stream_datum", stream_datum(res, desc, 3, 40, 4, 41))
    assert reads == [(3, 4), (4, 14), (14, 24), (24, 34), (34, 40)] and not sink.reasons
    assert [j.frame_uid for j in sink.frames] == [f"{desc.descriptor_doc['uid']}/{s}" for s in range(4, 41)]
    for job, want in zip(sink.frames, frames[3:]):
        np.testing.assert_array_equal(job.frame, want)
    # rows that stop coming part-way are counted to the datum's end, once, and not waited for again
    sink.clear()
    reads.clear()
    router("stream_datum", stream_datum(res, desc, 30, 60, 31, 61))
    assert reads == [(30, 31), (31, 41)] and len(sink.frames) == 10
    assert sink.reasons == ["frames_not_written"] * 20 and "rows 40:60" in sink.rejections[0][1]


@pytest.mark.timeout(60)  # before the fix this counted 10**9 rejections, one by one
def test_a_stream_datum_claiming_more_rows_than_max_datums_per_run_is_refused_unread(tmp_path: Path) -> None:
    frames = test_frames(200, (8, 8))
    sink, router, _run, desc, res = h5_stream(tmp_path, frames, max_datums_per_run=100)
    router("stream_datum", stream_datum(res, desc, 0, 101, 1, 102))
    assert sink.reasons == ["bad_document"] and not sink.frames
    assert "101 rows" in sink.rejections[0][1] and "max_datums_per_run (100)" in sink.rejections[0][1]
    router("stream_datum", stream_datum(res, desc, 100, 200, 101, 201))  # at the bound: read
    assert len(sink.frames) == 100 and sink.reasons == ["bad_document"]
    np.testing.assert_array_equal(sink.frames[0].frame, frames[100])
    # the reviewer's case: rows 0:10**9 of a resource no reader can read, seq_nums unset
    sink.clear()
    router = BlueskyRouter(sink, BlueskyIngestConfig(early_documents_s=0))
    run, desc, res = stream_run(router, "file://localhost/nonexistent.h5", mimetype="application/x-unknown")
    t0 = time.monotonic()
    router("stream_datum", stream_datum(res, desc, 0, 10**9, 0, 0))
    assert time.monotonic() - t0 < 5.0
    assert sink.reasons == ["bad_document"] and "1000000000 rows" in sink.rejections[0][1]
    router("stop", run.compose_stop())
    assert router.open_runs == [] and sink.stopped[0].rejected == {"bad_document": 1}


@pytest.mark.parametrize(("field", "value"), [("seq_nums.stop", math.inf), ("seq_nums.start", -math.inf),
                                              ("seq_nums.stop", math.nan), ("seq_nums.stop", 2.5),
                                              ("indices.stop", math.inf), ("indices.start", "0")])
def test_stream_datum_indices_that_are_not_integers_are_bad_documents(
        tmp_path: Path, field: str, value: Any) -> None:
    sink, router, run, desc, res = h5_stream(tmp_path, test_frames(2, (8, 8)))
    datum = stream_datum(res, desc, 0, 2, 1, 3)
    group, end = field.split(".")
    datum[group] = {**datum[group], end: value}
    router("stream_datum", datum)
    assert sink.reasons == ["bad_document"] and not sink.frames
    assert f"{field} is not an integer" in sink.rejections[0][1]
    router("stream_datum", {**stream_datum(res, desc, 0, 2, 1, 3), "uid": "again"})  # the datum resent, good
    assert len(sink.frames) == 2
    router("stop", run.compose_stop())
    assert sink.stopped[0].rejected == {"bad_document": 1}


# -- over the wire: NaN / Infinity as the JSON tokens and msgpack floats, 10**400 as a JSON integer --


@pytest.fixture(scope="module")
def proxy() -> tuple[str, str]:
    return start_proxy()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj))


SERIALIZERS: dict[str, Callable[[Any], bytes]] = {
    "json": lambda doc: json.dumps(doc, default=_json_default).encode(),  # writes NaN, Infinity
    "msgpack": functools.partial(msgpack.dumps, default=msgpack_numpy.encode),
}


@contextlib.contextmanager
def ingest_and_publisher(proxy: tuple[str, str], serializer: str) -> Iterator[tuple[RecordingSink, Publisher]]:
    in_addr, out_addr = proxy
    sink = RecordingSink()
    ingest = ZmqIngest(IngestConfig.model_validate(
        {"bluesky": {"address": out_addr, "serializer": serializer, "early_documents_s": 0.2}}), sink)
    ingest.start()
    pub = Publisher(in_addr, serializer=SERIALIZERS[serializer])
    try:
        wait_until_connected(lambda: pub("probe", {}), sink, "unknown_document")
        yield sink, pub
        assert ingest.running
    finally:
        pub.close()
        assert ingest.stop(timeout=5.0)


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_non_finite_times_over_zmq_are_refused_and_later_runs_are_whole(proxy: tuple[str, str],
                                                                         serializer: str) -> None:
    frames = test_frames(2)
    with ingest_and_publisher(proxy, serializer) as (sink, pub):
        bad = compose_run()
        pub("start", {**bad.start_doc, "time": math.nan})
        if serializer == "json":
            pub("start", {**compose_run().start_doc, "time": 10**400})
        pub("stop", bad.compose_stop())  # its start refused: unknown_run once held long enough
        good = compose_run()
        desc = good.compose_descriptor(name="primary", data_keys={"img": image_key()})
        pub("start", good.start_doc)
        pub("descriptor", desc.descriptor_doc)
        nan_stamp = desc.compose_event(data={"img": frames[0]}, timestamps={"img": math.nan}, validate=False)
        inf_stamp = desc.compose_event(data={"img": frames[0]}, timestamps={"img": math.inf}, validate=False)
        fine = desc.compose_event(data={"img": frames[1]}, timestamps={"img": 7.0})
        for ev in (nan_stamp, inf_stamp, fine):
            pub("event", ev)
        pub("stop", good.compose_stop())
        sink.wait_for(lambda s: s.stopped and "unknown_run" in s.reasons)
    n_bad = 4 if serializer == "json" else 3
    assert sorted(sink.reasons) == ["bad_document"] * n_bad + ["unknown_run"]
    assert "internal_error" not in sink.reasons
    assert [s.run_uid for s in sink.started] == [good.start_doc["uid"]]
    assert [(j.frame_uid, j.timestamp) for j in sink.frames] == [(fine["uid"], 7.0)]
    assert all(math.isfinite(s.time) for s in [*sink.started, *sink.stopped])
    assert sink.stopped[0].rejected == {"bad_document": 2}


def test_infinite_seq_nums_over_zmq_json_are_bad_documents(proxy: tuple[str, str], tmp_path: Path) -> None:
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=test_frames(2, (8, 8)))
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key((1, 8, 8), external="STREAM:")})
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                      data_key="img", parameters={"dataset": "/data"})
    with ingest_and_publisher(proxy, "json") as (sink, pub):
        pub("start", run.start_doc)
        pub("descriptor", desc.descriptor_doc)
        pub("stream_resource", res.stream_resource_doc)
        pub("stream_datum", stream_datum(res, desc, 0, 2, 1, math.inf))  # "Infinity" on the wire
        pub("stream_datum", stream_datum(res, desc, 0, 2, 1, 3))
        pub("stop", run.compose_stop())
        sink.wait_for(lambda s: s.stopped)
    assert sink.reasons == ["bad_document"] and "seq_nums.stop is not an integer" in sink.rejections[0][1]
    assert len(sink.frames) == 2 and sink.stopped[0].rejected == {"bad_document": 1}
