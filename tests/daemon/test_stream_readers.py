"""daemon/stream_readers.py and the router's stream_resource / stream_datum path, with a real
ophyd-async detector writing HDF5 in a RunEngine plan."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import DocumentNames, compose_run, schema_validators

from nanoseg_daemon.bluesky_ingest import BlueskyRouter
from nanoseg_daemon.ingest_config import BlueskyIngestConfig
from nanoseg_daemon.stream_readers import HDF5StreamReader, StreamReadError, path_from_uri
from tests.daemon.ingest_fixtures import RecordingSink, blob_detector


@pytest.fixture(scope="module")
def RE() -> RunEngine:
    return RunEngine({}, context_managers=[])


def test_path_from_uri() -> None:
    assert path_from_uri("file://localhost/data/a%20b.h5") == Path("/data/a b.h5")
    assert path_from_uri("/data/x.h5") == Path("/data/x.h5")
    with pytest.raises(StreamReadError, match="only file://"):
        path_from_uri("s3://bucket/x.h5")


def test_ophyd_async_detector_frames_reach_the_sink_as_written(RE: RunEngine, tmp_path: Path) -> None:
    det = blob_detector(tmp_path)
    sink = RecordingSink()
    router = BlueskyRouter(sink)
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    token = RE.subscribe(router)
    try:
        (uid,) = RE(bp.count([det], num=4))
    finally:
        RE.unsubscribe(token)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    names = [n for n, _ in docs]
    assert names.count("stream_resource") == 2 and names.count("stream_datum") == 8  # image + sum
    assert not sink.rejections
    assert [f.seq_num for f in sink.frames] == [1, 2, 3, 4]
    (desc,) = [d for n, d in docs if n == "descriptor"]
    events = [d for n, d in docs if n == "event"]
    assert [f.frame_uid for f in sink.frames] == [f"{desc['uid']}/{e['seq_num']}" for e in events]
    (resource,) = [d for n, d in docs if n == "stream_resource" and d["data_key"] == "det"]
    with h5py.File(path_from_uri(resource["uri"]), "r", swmr=True) as f:
        written = f[resource["parameters"]["dataset"]][()]
    assert written.shape == (4, 240, 320) and written.dtype == np.uint8 and written.any()
    for job, frame in zip(sink.frames, written):
        np.testing.assert_array_equal(job.frame, frame)
    assert [s.run_uid for s in sink.stopped] == [uid] and router.open_runs == []


def stream_run(path: Path, rows: int, shape: tuple[int, ...] = (1, 8, 8)):
    """A run with an image key streamed from ``path`` at /data, and a datum for ``rows`` rows."""
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={"img": {
        "dtype": "array", "shape": list(shape), "source": "sim", "external": "STREAM:"}})
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                                      data_key="img", parameters={"dataset": "/data"})
    datum = res.compose_stream_datum(indices={"start": 0, "stop": rows}, seq_nums={"start": 1, "stop": rows + 1},
                                     descriptor=desc.descriptor_doc)
    return run, desc, res.stream_resource_doc, dict(datum)


def test_frames_not_yet_flushed_are_waited_for_and_those_never_written_counted(tmp_path: Path) -> None:
    path = tmp_path / "late.h5"
    f = h5py.File(path, "w", libver="latest")
    ds = f.create_dataset("data", shape=(0, 8, 8), maxshape=(None, 8, 8), dtype=np.uint16, chunks=(1, 8, 8))
    f.swmr_mode = True
    frames = np.arange(3 * 64, dtype=np.uint16).reshape(3, 8, 8)

    def write_late() -> None:  # two frames arrive 0.3 s after their datum, the third never
        time.sleep(0.3)
        ds.resize(2, axis=0)
        ds[:2] = frames[:2]
        ds.flush()

    sink = RecordingSink()
    router = BlueskyRouter(sink, BlueskyIngestConfig(stream_wait_s=1.0))
    run, desc, resource, datum = stream_run(path, rows=3)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", resource)):
        router(name, doc)
    writer = threading.Thread(target=write_late)
    writer.start()
    router("stream_datum", datum)
    writer.join()
    f.close()
    assert len(sink.frames) == 2
    for job, frame in zip(sink.frames, frames):
        np.testing.assert_array_equal(job.frame, frame)
    assert sink.reasons == ["frames_not_written"]  # one per frame that never came
    assert "rows 2:3" in sink.rejections[0][1]


def test_unreadable_stream_resources_are_counted_per_frame(tmp_path: Path) -> None:
    sink = RecordingSink()
    router = BlueskyRouter(sink, BlueskyIngestConfig(stream_wait_s=0.05, early_documents_s=0))
    run, desc, resource, datum = stream_run(tmp_path / "never.h5", rows=2)
    for name, doc in (("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", resource), ("stream_datum", datum)):
        router(name, doc)
    assert sink.reasons == ["fill_failed", "fill_failed"] and sink.logged == ["fill_failed"]  # each frame, one line
    router("stream_datum", {**datum, "uid": "x", "stream_resource": "nope"})
    assert sink.reasons[-1] == "unknown_resource" and not sink.frames


def test_hdf5_reader_reads_a_file_not_in_swmr_mode(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data", data=np.ones((2, 4, 4), np.float32))
    reader = HDF5StreamReader(str(path), {"dataset": "entry/data"}, wait_s=0.0)
    assert reader.read(1, 2).shape == (1, 4, 4)
    reader.close()
    with pytest.raises(StreamReadError, match="dataset"):
        HDF5StreamReader(str(path), {})
