"""daemon/raw_ingest.py: validating [header JSON, buffer] raw frame messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanoseg.codec import msgpack_dumps
from nanoseg_daemon.contracts import FrameJob, RunStopped
from nanoseg_daemon.ingest_config import RawIngestConfig
from nanoseg_daemon.raw_ingest import MAX_HEADER_BYTES, RawFrameDecoder, RawFrameHeader
from nanoseg_daemon.wire import WireError
from tests.daemon.ingest_fixtures import RecordingSink


def header(**fields) -> bytes:
    h = {
        "frame_id": 1,
        "run": "scan-1",
        "dtype": "uint16",
        "shape": [3, 4],
        "timestamp": 1767225600.5,
        "metadata": {"pixel_size_nm": 12.5, "i0": 4000, "profile": "stxm", "extra": {"s": "V2O5"}},
    }
    h.update(fields)
    return json.dumps({k: v for k, v in h.items() if v is not None}).encode()


def frame_parts(frame: np.ndarray, **fields) -> list[bytes]:
    fields.setdefault("dtype", str(frame.dtype))
    fields.setdefault("shape", list(frame.shape))
    return [header(**fields), frame.astype(frame.dtype.newbyteorder("<")).tobytes()]


def rejected(decoder: RawFrameDecoder, parts) -> str:
    with pytest.raises(WireError) as err:
        decoder.decode(parts)
    return err.value.reason


def test_a_good_frame_becomes_a_frame_job_after_its_run_started():
    sink = RecordingSink()
    dec = RawFrameDecoder(RawIngestConfig(source="stxm1"), clock=lambda: 42.0)
    image = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    dec.handle(frame_parts(image, frame_id=7), sink)
    dec.handle(frame_parts(image + 1, frame_id="8b"), sink)
    dec.handle([header(end_of_run=True, frame_id=None, dtype=None, shape=None), b""], sink)
    assert sink.order == [
        ("start", "raw:stxm1:scan-1"),
        ("frame", "raw:stxm1:scan-1"),
        ("frame", "raw:stxm1:scan-1"),
        ("stop", "raw:stxm1:scan-1"),
    ]
    (started,) = sink.started
    assert started.metadata.pixel_size_nm == 12.5 and started.metadata.profile == "stxm"
    assert started.start_doc["raw_run"] == "scan-1" and started.time == 1767225600.5
    first, second = sink.frames
    np.testing.assert_array_equal(first.frame, image)
    np.testing.assert_array_equal(second.frame, image + 1)
    assert first.frame.dtype == np.uint16
    assert (first.frame_uid, second.frame_uid) == ("raw:stxm1:scan-1:7", "raw:stxm1:scan-1:8b")
    assert (first.seq_num, second.seq_num) == (1, 2)
    assert first.metadata.i0 == 4000.0
    assert first.metadata.extra == {"s": "V2O5", "frame_id": 7, "raw_run": "scan-1"}
    assert first.timestamp == 1767225600.5 and first.received_monotonic == 42.0
    assert sink.stopped == [RunStopped("raw:stxm1:scan-1", "success", 1767225600.5)]
    assert not sink.rejections
    # the same run id again is a new run
    dec.handle(frame_parts(image, frame_id=9), sink)
    assert sink.order[-2:] == [("start", "raw:stxm1:scan-1"), ("frame", "raw:stxm1:scan-1")]
    assert sink.frames[-1].seq_num == 1


@pytest.mark.parametrize(
    "dtype", ["uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"]
)
def test_every_whitelisted_dtype_decodes_exactly(dtype):
    image = (np.arange(20).reshape(4, 5) * 3 - 7 * (dtype[0] != "u")).astype(dtype)
    job = RawFrameDecoder().decode(frame_parts(image))
    assert isinstance(job, FrameJob)
    assert job.frame.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(job.frame, image)


def test_big_endian_buffers_are_not_assumed():
    image = np.arange(6, dtype=">u2").reshape(2, 3)
    job = RawFrameDecoder().decode([header(dtype="uint16", shape=[2, 3]), image.tobytes()])
    assert isinstance(job, FrameJob)
    assert not np.array_equal(job.frame, image)  # wire order is little-endian, as documented
    np.testing.assert_array_equal(job.frame, image.byteswap())  # same bytes, swapped value


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        ([header()], "bad_framing"),
        ([header(), b"\x00" * 24, b"extra"], "bad_framing"),
        ([], "bad_framing"),
        ([header(), b"\x00" * 23], "size_mismatch"),
        ([header(), b"\x00" * 25], "size_mismatch"),
        ([header(), b""], "size_mismatch"),
        ([header(dtype="int64"), b"\x00" * 96], "bad_dtype"),
        ([header(dtype="complex64"), b"\x00" * 96], "bad_dtype"),
        ([header(dtype="<u2"), b"\x00" * 24], "bad_dtype"),
        ([header(shape=[12]), b"\x00" * 24], "bad_shape"),
        ([header(shape=[2, 3, 2]), b"\x00" * 24], "bad_shape"),
        ([header(shape=[0, 4]), b""], "bad_shape"),
        ([header(shape=[-3, -4]), b"\x00" * 24], "bad_shape"),
        ([header(shape=[3.5, 4]), b"\x00" * 24], "bad_shape"),
        ([b'{"frame_id": 1, ', b"\x00" * 24], "bad_header"),
        ([b"\xff\xfe" + header(), b"\x00" * 24], "bad_header"),
        ([b"[1, 2]", b"\x00" * 24], "bad_header"),
        ([header(colour="red"), b"\x00" * 24], "bad_header"),
        ([header(timestamp=None), b"\x00" * 24], "bad_header"),
        ([header().replace(b"1767225600.5", b"NaN"), b"\x00" * 24], "bad_header"),
        ([header(frame_id=None), b"\x00" * 24], "bad_header"),
        ([header(frame_id=1.5), b"\x00" * 24], "bad_header"),
        ([header(metadata={"pixel_size_nm": -1}), b"\x00" * 24], "bad_header"),
        ([header(metadata={"pixel_sise_nm": 1}), b"\x00" * 24], "bad_header"),
        ([b" " * 70_000, b"\x00" * 24], "bad_header"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(parts, reason):
    assert rejected(RawFrameDecoder(), parts) == reason


def test_oversize_is_judged_from_the_header_before_the_buffer():
    dec = RawFrameDecoder(RawIngestConfig(max_frame_bytes=4096, max_dim=100))
    assert rejected(dec, [header(shape=[64, 64], dtype="float64"), b"\x00" * 24]) == "oversize"
    assert rejected(dec, [header(shape=[1, 101], dtype="uint8"), b"\x00" * 101]) == "oversize"
    ok = dec.decode([header(shape=[64, 64], dtype="uint8"), b"\x01" * 4096])
    assert isinstance(ok, FrameJob) and ok.frame.shape == (64, 64)


def test_all_nan_frames_are_rejected_partial_nan_frames_pass():
    nan = np.full((3, 4), np.nan, np.float32)
    assert rejected(RawFrameDecoder(), frame_parts(nan)) == "nan_frame"
    partly = nan.copy()
    partly[1, 2] = 5.0
    job = RawFrameDecoder().decode(frame_parts(partly))
    assert isinstance(job, FrameJob) and np.isnan(job.frame).sum() == 11
    lenient = RawFrameDecoder(RawIngestConfig(reject_all_nan=False))
    assert isinstance(lenient.decode(frame_parts(nan)), FrameJob)


def test_end_of_run_rules():
    dec = RawFrameDecoder()
    end = header(end_of_run=True, frame_id=None, dtype=None, shape=None)
    assert rejected(dec, [end, b""]) == "unknown_run"
    dec.decode(frame_parts(np.zeros((3, 4), np.uint16)))
    assert rejected(dec, [end, b"\x00" * 24]) == "bad_framing"
    assert isinstance(dec.decode([end, b""]), RunStopped)
    assert dec.open_runs == []


def test_a_rejected_first_frame_does_not_open_its_run():
    sink = RecordingSink()
    dec = RawFrameDecoder()
    dec.handle([header(), b"\x00" * 3], sink)
    assert sink.reasons == ["size_mismatch"] and not sink.started and dec.open_runs == []


def test_runs_beyond_the_cap_evict_the_least_active():
    sink = RecordingSink()
    dec = RawFrameDecoder(RawIngestConfig(max_open_runs=2, source="d"))
    image = np.zeros((3, 4), np.uint16)
    for i, run in enumerate(["a", "b", "a", "c"]):
        dec.handle(frame_parts(image, run=run, frame_id=i), sink)
    assert [s.run_uid for s in sink.started] == ["raw:d:a", "raw:d:b", "raw:d:c"]
    assert [(s.run_uid, s.exit_status) for s in sink.stopped] == [("raw:d:b", "fail")]
    assert sink.reasons == ["too_many_runs"]
    assert dec.open_runs == ["raw:d:a", "raw:d:c"]


def test_header_model_forbids_unknown_keys_and_documents_its_fields():
    assert RawFrameHeader.model_config["extra"] == "forbid"
    for name, f in RawFrameHeader.model_fields.items():
        assert f.description or name == "metadata", name


def rejection(decoder: RawFrameDecoder, parts) -> WireError:
    with pytest.raises(WireError) as err:
        decoder.decode(parts)
    return err.value


def nested(depth: int, leaf=1):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"count": 2**70}, "metadata.extra.count"),
        ({"count": 2**64}, "metadata.extra.count"),
        ({"count": -(2**63) - 1}, "metadata.extra.count"),
        ({"scan": {"ids": [1, 2, 10**30]}}, "metadata.extra.scan.ids.2"),
        ({"gain": float("nan")}, "metadata.extra.gain"),  # json.loads reads NaN
        ({"gain": float("-inf")}, "metadata.extra.gain"),
        ({"sample": "\ud800"}, "metadata.extra.sample"),  # a lone surrogate: not UTF-8
        ({"\udfff": 1}, "metadata.extra"),
        ({"deep": nested(16)}, "metadata.extra.deep" + ".0" * 15),  # 17 levels with extra itself
    ],
)
def test_metadata_extra_must_be_data_msgpack_can_encode(extra, field):
    err = rejection(RawFrameDecoder(), [header(metadata={"extra": extra}), b"\x00" * 24])
    assert err.reason == "bad_header"
    assert f"{field}: " in err.detail, err.detail


def test_metadata_extra_at_the_limits_reaches_the_run_start_and_encodes():
    extra = {"big": 2**64 - 1, "small": -(2**63), "f": 1e308, "t": "V₂O₅ 😀", "n": None,
             "b": True, "deep": nested(15)}  # fmt: skip
    sink = RecordingSink()
    RawFrameDecoder().handle([header(metadata={"extra": extra}), b"\x00" * 24], sink)
    assert not sink.rejections
    (started,), (job,) = sink.started, sink.frames
    assert started.start_doc["metadata"]["extra"] == extra
    assert job.metadata.extra["big"] == 2**64 - 1
    msgpack_dumps(started.start_doc)  # what the analysis run's start needs (it raised for 2**70)
    msgpack_dumps(job.metadata.extra)


def test_frame_ids_and_run_ids_must_be_encodable():
    dec = RawFrameDecoder()
    for fields in ({"frame_id": 2**64}, {"frame_id": -(2**63) - 1}, {"run": "\ud800"},
                   {"frame_id": "a\udc00"}, {"metadata": {"profile": "\ud800"}}):  # fmt: skip
        assert rejected(dec, [header(**fields), b"\x00" * 24]) == "bad_header", fields
    assert isinstance(dec.decode([header(frame_id=2**64 - 1), b"\x00" * 24]), FrameJob)


@pytest.mark.parametrize("t", [1767225600500.0, 2.0**32, 1e300, 10**20, 0.0, -1.0])
def test_timestamp_must_be_plausible_posix_seconds(t):
    dec = RawFrameDecoder()
    for fields in ({}, {"end_of_run": True, "frame_id": None, "dtype": None, "shape": None}):
        h = header(timestamp=1, **fields)
        h = h.replace(b'"timestamp": 1,', f'"timestamp": {t!r},'.encode())  # 10**20 stays an int
        buffer = b"" if fields else b"\x00" * 24
        err = rejection(dec, [h, buffer])
        assert err.reason == "bad_header"
        assert "timestamp: " in err.detail and "seconds since the epoch" in err.detail, err.detail
    assert dec.open_runs == []


def test_timestamp_bounds_are_documented_and_inclusive_of_small_and_2106_times():
    assert "2**32" in (RawFrameHeader.model_fields["timestamp"].description or "")
    dec = RawFrameDecoder()
    for t in (5.0, 1767225600.25, 2.0**32 - 1):
        job = dec.decode([header(timestamp=t), b"\x00" * 24])
        assert isinstance(job, FrameJob) and job.timestamp == t


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 60_000,
        b'{"frame_id": ' + b"[" * 30_000,
        b'{"frame_id": 1, "metadata": {"extra": {"a": ' + b"[" * 5_000 + b"]" * 5_000 + b"}}}",
        b'{"frame_id": ' + b"7" * 5_000 + b"}",  # more digits than int() reads
    ],
)
def test_headers_too_deep_or_too_long_a_number_are_bad_headers(data):
    assert len(data) <= MAX_HEADER_BYTES
    sink = RecordingSink()
    RawFrameDecoder().handle([data, b"\x00" * 24], sink)
    assert sink.reasons == ["bad_header"] and not sink.frames


def test_distinct_source_run_frame_ids_give_distinct_uids():
    dec = RawFrameDecoder(RawIngestConfig(source="det"))
    ids = [("a", "b:1"), ("a:b", 1), ("a:b", "1"), ("a%3Ab", 1), ("a", "b%3A1"), ("a", "b%253A1"),
           ("a:b:1", "x"), ("a", "b:1:x"), ("%", "%"), ("%25", "%25"), (":", ":"), ("%3A", "%3A")]  # fmt: skip
    uids = []
    for run, frame_id in ids:
        job = dec.decode([header(run=run, frame_id=frame_id), b"\x00" * 24])
        assert isinstance(job, FrameJob)
        assert job.run_uid == dec.run_uid(run) and job.frame_uid.startswith(job.run_uid + ":")
        assert job.frame_uid.count(":") == 3 and job.metadata.extra["raw_run"] == run
        uids.append(job.frame_uid)
    assert len(set(uids)) == len(uids) - 1  # only ("a:b", 1) and ("a:b", "1"): ids compare as text
    run_uids = {dec.run_uid(run) for run, _ in ids}
    assert len(run_uids) == len({run for run, _ in ids})
    assert uids[0] == "raw:det:a:b%3A1" and uids[1] == "raw:det:a%3Ab:1"
    assert dec.run_uid("scan-1.2_x") == "raw:det:scan-1.2_x"  # ids without ':' or '%' as before
