"""daemon/bluesky_ingest.py: bluesky documents -> RunStarted / FrameJob / RunStopped."""

from __future__ import annotations

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import compose_run, pack_event_page

from nanoseg_daemon.bluesky_ingest import BlueskyRouter
from nanoseg_daemon.ingest_config import DEFAULT_METADATA_KEYS, BlueskyIngestConfig
from nanoseg_daemon.run_metadata import metadata_from_start
from tests.daemon.ingest_fixtures import HDF5Camera, ImageCamera, RecordingSink, test_frames

H, W = 24, 32


@pytest.fixture(scope="module")
def RE() -> RunEngine:
    return RunEngine({}, context_managers=[])


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


def run_plan(RE, router, plan, **md):
    token = RE.subscribe(router)
    try:
        (uid,) = RE(plan, **md)
    finally:
        RE.unsubscribe(token)
    return uid


def image_key(shape=(H, W), **extra):
    return {"dtype": "array", "shape": list(shape), "source": "sim", **extra}


def test_run_engine_with_inline_images(RE, sink):
    frames = test_frames(4)
    cam = ImageCamera(name="cam", frames=frames)
    dark = np.full((H, W), 3.0)
    router = BlueskyRouter(sink)
    uid = run_plan(
        RE,
        router,
        bp.count([cam], num=4),
        pixel_size_nm=6.5,
        i0=12000,
        dark=dark,
        nanoseg_profile="ptychography",
        sample="V2O5 batch 3",
    )
    assert sink.order == [("start", uid)] + [("frame", uid)] * 4 + [("stop", uid)]
    (started,) = sink.started
    md = started.metadata
    assert (md.pixel_size_nm, md.i0, md.profile) == (6.5, 12000.0, "ptychography")
    np.testing.assert_array_equal(md.dark_frame, dark)
    assert md.flat_field is None
    assert md.extra == {"scan_id": started.start_doc["scan_id"], "sample": "V2O5 batch 3"}
    assert started.start_doc["plan_name"] == "count"
    for k, job in enumerate(sink.frames):
        np.testing.assert_array_equal(job.frame, frames[k])
        assert job.frame.dtype == np.uint16
        assert job.seq_num == k + 1
        assert job.metadata.pixel_size_nm == 6.5 and job.metadata.dark_frame is md.dark_frame
    assert len({j.frame_uid for j in sink.frames}) == 4
    assert sink.frames[0].timestamp <= sink.frames[-1].timestamp
    assert [(s.run_uid, s.exit_status) for s in sink.stopped] == [(uid, "success")]
    assert not sink.rejections
    assert router.open_runs == []


def test_run_engine_with_hdf5_files_through_resource_and_datum(RE, sink, tmp_path):
    frames = test_frames(3, dtype=np.float32)
    cam = HDF5Camera(name="cam", frames=frames, directory=tmp_path)
    router = BlueskyRouter(sink)
    uid = run_plan(RE, router, bp.count([cam], num=3), pixel_size_nm=35.0)
    assert not sink.rejections
    assert [j.run_uid for j in sink.frames] == [uid] * 3
    for k, job in enumerate(sink.frames):
        assert isinstance(job.frame, np.ndarray) and job.frame.shape == (H, W)
        np.testing.assert_array_equal(job.frame, frames[k])
    assert sink.stopped[0].exit_status == "success"
    # the run is forgotten and its handler closed its file: it can be rewritten
    assert router.open_runs == []
    import h5py

    with h5py.File(cam.files[0], "w") as f:
        f["x"] = 1


def test_missing_file_and_unknown_datum_are_fill_failed(sink, tmp_path):
    router = BlueskyRouter(sink, BlueskyIngestConfig(fill_retry_intervals=[], early_documents_s=0))
    run = compose_run()
    router("start", run.start_doc)
    desc = run.compose_descriptor(
        name="primary", data_keys={"img": image_key((1, H, W), external="FILESTORE:")}
    )
    router("descriptor", desc.descriptor_doc)
    res = run.compose_resource(
        spec="AD_HDF5",
        root=str(tmp_path),
        resource_path="absent.h5",
        resource_kwargs={"frame_per_point": 1},
    )
    router("resource", res.resource_doc)
    router("datum", res.compose_datum(datum_kwargs={"point_number": 0}))
    router(
        "event",
        desc.compose_event(
            data={"img": f"{res.resource_doc['uid']}/0"},
            timestamps={"img": 1.0},
            filled={"img": False},
        ),
    )
    router(
        "event",
        desc.compose_event(
            data={"img": "no-such-datum"}, timestamps={"img": 1.0}, filled={"img": False}
        ),
    )
    router("datum", {"resource": "no-such-resource", "datum_id": "x/0", "datum_kwargs": {}})
    assert sink.reasons == ["fill_failed", "fill_failed", "unknown_resource"]
    assert "absent.h5" in sink.rejections[0][1]
    assert not sink.frames


def test_metadata_keys_can_be_renamed_and_nested():
    keys = {
        **DEFAULT_METADATA_KEYS,
        "pixel_size_nm": "detector.pixel_nm",
        "i0": "I0",
        "operator": "who",
    }
    doc = {
        "uid": "u",
        "time": 1.0,
        "detector": {"pixel_nm": 20},
        "I0": np.float64(900.0),
        "pixel_size_nm": 99.0,
        "who": "ada",
        "scan_id": np.int64(12),
        "flat": [[1, 2], [3, 4]],
    }
    md, problems = metadata_from_start(doc, keys, "flat")
    assert problems == []
    assert (md.pixel_size_nm, md.i0, md.profile, md.dark_frame) == (20.0, 900.0, None, None)
    assert md.extra == {"operator": "ada", "scan_id": 12} and type(md.extra["scan_id"]) is int
    np.testing.assert_array_equal(md.flat_field, [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pixel_size_nm", "big"),
        ("pixel_size_nm", -2.0),
        ("i0", float("nan")),
        ("i0", True),
        ("dark", [1, 2, 3]),
        ("dark", "dark.tif"),
        ("nanoseg_profile", 7),
        ("flat_field", [[["a"]]]),
    ],
)
def test_wrong_metadata_is_reported_and_left_out(sink, field, value):
    router = BlueskyRouter(sink)
    run = compose_run(
        metadata={field: value, "pixel_size_nm" if field != "pixel_size_nm" else "i0": 5}
    )
    router("start", run.start_doc)
    (started,) = sink.started
    assert sink.reasons == ["bad_metadata"]
    md = started.metadata
    assert None in (md.pixel_size_nm, md.i0) and md.dark_frame is None and md.profile is None
    assert md.flat_field is None


def test_flat_field_from_start_then_from_events(sink):
    router = BlueskyRouter(sink, BlueskyIngestConfig(image_key="img", flat_field_key="flat"))
    flat0, flat1 = np.full((H, W), 100.0), np.full((H, W), 200.0)
    run = compose_run(metadata={"flat": flat0})
    router("start", run.start_doc)
    primary = run.compose_descriptor(
        name="primary", data_keys={"img": image_key(), "other": image_key()}
    )
    flats = run.compose_descriptor(name="flat", data_keys={"flat": image_key()})
    router("descriptor", primary.descriptor_doc)
    router("descriptor", flats.descriptor_doc)
    img = test_frames(3)
    ev = [
        primary.compose_event(
            data={"img": img[k], "other": img[2]}, timestamps={"img": 10.0 + k, "other": 0.0}
        )
        for k in range(2)
    ]
    router("event", ev[0])
    router("event", flats.compose_event(data={"flat": flat1}, timestamps={"flat": 11.0}))
    router("event", ev[1])
    assert not sink.rejections
    assert [j.frame[0, 1] for j in sink.frames] == [
        img[0][0, 1],
        img[1][0, 1],
    ]  # image_key chose img
    np.testing.assert_array_equal(sink.frames[0].metadata.flat_field, flat0)
    np.testing.assert_array_equal(sink.frames[1].metadata.flat_field, flat1)
    assert [j.timestamp for j in sink.frames] == [10.0, 11.0]


def test_flat_field_in_descriptor_configuration(sink):
    router = BlueskyRouter(sink)
    run = compose_run()
    router("start", run.start_doc)
    flat = np.full((H, W), 7.0)
    desc = run.compose_descriptor(
        name="primary",
        data_keys={"img": image_key()},
        configuration={
            "cam": {
                "data": {"flat_field": flat},
                "timestamps": {"flat_field": 0.0},
                "data_keys": {"flat_field": image_key()},
            }
        },
    )
    router("descriptor", desc.descriptor_doc)
    router("event", desc.compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0}))
    np.testing.assert_array_equal(sink.frames[0].metadata.flat_field, flat)


def test_event_page_and_image_stacks(sink):
    router = BlueskyRouter(sink)
    run = compose_run()
    router("start", run.start_doc)
    desc = run.compose_descriptor(
        name="primary", data_keys={"img": image_key((1, H, W)), "stack": image_key((2, H, W))}
    )
    router("descriptor", desc.descriptor_doc)
    frames = test_frames(4)
    events = [
        desc.compose_event(
            data={"img": frames[k : k + 1], "stack": frames[:2]},
            timestamps={"img": 1.0 + k, "stack": 1.0},
        )
        for k in range(3)
    ]
    router("event_page", pack_event_page(*events))
    assert [j.frame_uid for j in sink.frames] == [e["uid"] for e in events]
    assert [j.seq_num for j in sink.frames] == [1, 2, 3]
    for k, job in enumerate(sink.frames):
        np.testing.assert_array_equal(job.frame, frames[k])

    sink.clear()
    stack_router = BlueskyRouter(sink, BlueskyIngestConfig(image_key="stack"))
    run = compose_run()
    stack_router("start", run.start_doc)
    stack_router(
        "descriptor",
        (
            desc := run.compose_descriptor(
                name="primary", data_keys={"stack": image_key((2, H, W))}
            )
        ).descriptor_doc,
    )
    ev = desc.compose_event(data={"stack": frames[:2]}, timestamps={"stack": 1.0})
    stack_router("event", ev)
    assert [j.frame_uid for j in sink.frames] == [f"{ev['uid']}/0", f"{ev['uid']}/1"]
    np.testing.assert_array_equal(sink.frames[1].frame, frames[1])


def test_streams_without_images_give_no_frames(sink):
    router = BlueskyRouter(sink)
    run = compose_run()
    router("start", run.start_doc)
    base = run.compose_descriptor(
        name="baseline", data_keys={"temp": {"dtype": "number", "shape": [], "source": "t"}}
    )
    router("descriptor", base.descriptor_doc)
    router("event", base.compose_event(data={"temp": 300.0}, timestamps={"temp": 1.0}))
    assert not sink.frames and not sink.rejections


def test_out_of_order_and_duplicate_documents_are_rejected_never_raised(sink):
    router = BlueskyRouter(sink, BlueskyIngestConfig(early_documents_s=0))  # nothing held: counted at once
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key()})
    event = desc.compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0})
    stop = run.compose_stop()
    router("stop", stop)  # stop without start
    router("descriptor", desc.descriptor_doc)  # descriptor for an unknown run
    router("event", event)  # event before its descriptor
    router("start", run.start_doc)
    router("start", run.start_doc)  # duplicate start
    router("event", event)  # still no descriptor
    router("descriptor", desc.descriptor_doc)
    router("descriptor", desc.descriptor_doc)  # duplicate descriptor
    router("event", event)
    router("event", event)  # duplicate event
    router(
        "event",
        {
            "uid": "x",
            "descriptor": desc.descriptor_doc["uid"],
            "time": 1.0,
            "data": {},
            "timestamps": {},
        },
    )
    router("event", {"uid": "y"})  # no descriptor key
    router("bulk_events", {})  # a document type the daemon does not handle
    router("start", {"time": 1.0})  # no uid
    router("stop", stop)
    router("event", desc.compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0}))
    router("stop", stop)
    router("start", run.start_doc)  # a stopped run cannot start again
    assert sink.reasons == [
        "unknown_run",
        "unknown_run",
        "unknown_descriptor",
        "duplicate_uid",
        "unknown_descriptor",
        "duplicate_uid",
        "duplicate_uid",
        "missing_image",
        "bad_document",
        "unsupported_document",
        "bad_document",
        "unknown_descriptor",
        "run_closed",
        "duplicate_uid",
    ]
    assert len(sink.started) == 1 and len(sink.frames) == 1 and len(sink.stopped) == 1


def test_interleaved_runs_keep_their_own_frames_and_order(sink):
    router = BlueskyRouter(sink)
    runs = [compose_run(metadata={"sample": name}) for name in ("a", "b")]
    descs = []
    for run in runs:
        router("start", run.start_doc)
        descs.append(run.compose_descriptor(name="primary", data_keys={"img": image_key()}))
        router("descriptor", descs[-1].descriptor_doc)
    frames = test_frames(6)
    for k in range(6):
        router(
            "event",
            descs[k % 2].compose_event(data={"img": frames[k]}, timestamps={"img": float(k)}),
        )
    router("stop", runs[0].compose_stop())
    router("event", descs[1].compose_event(data={"img": frames[0]}, timestamps={"img": 9.0}))
    router("stop", runs[1].compose_stop(exit_status="abort"))
    a, b = (run.start_doc["uid"] for run in runs)
    assert [(j.run_uid, j.seq_num, j.metadata.extra["sample"]) for j in sink.frames] == [
        (a, 1, "a"),
        (b, 1, "b"),
        (a, 2, "a"),
        (b, 2, "b"),
        (a, 3, "a"),
        (b, 3, "b"),
        (b, 4, "b"),
    ]
    assert [j.timestamp for j in sink.frames[:6]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [(s.run_uid, s.exit_status) for s in sink.stopped] == [(a, "success"), (b, "abort")]
    assert not sink.rejections and router.open_runs == []


def test_open_runs_are_capped_by_evicting_the_least_active(sink):
    router = BlueskyRouter(sink, BlueskyIngestConfig(max_open_runs=2))
    runs = [compose_run() for _ in range(3)]
    router("start", runs[0].start_doc)
    router("start", runs[1].start_doc)
    desc0 = runs[0].compose_descriptor(name="primary", data_keys={"img": image_key()})
    router("descriptor", desc0.descriptor_doc)  # run 0 is now the more recently active
    router("start", runs[2].start_doc)
    uids = [r.start_doc["uid"] for r in runs]
    assert sink.reasons == ["too_many_runs"]
    assert [(s.run_uid, s.exit_status) for s in sink.stopped] == [(uids[1], "fail")]
    assert router.open_runs == [uids[0], uids[2]]
    router("stop", runs[1].compose_stop())
    assert sink.reasons[-1] == "run_closed"


def test_datums_are_capped_per_run(sink, tmp_path):
    import h5py

    frames = test_frames(3)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["entry/data/data"] = frames
    router = BlueskyRouter(sink, BlueskyIngestConfig(max_datums_per_run=2, fill_retry_intervals=[]))
    run = compose_run()
    router("start", run.start_doc)
    desc = run.compose_descriptor(
        name="primary", data_keys={"img": image_key((1, H, W), external="FILESTORE:")}
    )
    router("descriptor", desc.descriptor_doc)
    res = run.compose_resource(
        spec="AD_HDF5", root=str(tmp_path), resource_path="f.h5", resource_kwargs={}
    )
    router("resource", res.resource_doc)
    datums = [res.compose_datum(datum_kwargs={"point_number": k}) for k in range(3)]
    for d in datums:
        router("datum", d)
    for d in datums:
        router(
            "event",
            desc.compose_event(
                data={"img": d["datum_id"]}, timestamps={"img": 1.0}, filled={"img": False}
            ),
        )
    assert sink.reasons == ["fill_failed"]  # the oldest datum was forgotten
    np.testing.assert_array_equal(sink.frames[0].frame, frames[1])
    np.testing.assert_array_equal(sink.frames[1].frame, frames[2])


def test_bad_images_and_incomplete_documents_change_nothing(sink):
    router = BlueskyRouter(sink)
    run = compose_run()
    router("start", {k: v for k, v in run.start_doc.items() if k != "time"})
    assert sink.reasons == ["bad_document"] and router.open_runs == []
    router("start", run.start_doc)
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key()})
    router("descriptor", desc.descriptor_doc)
    bad_images = [
        [["a", "b"], ["c", "d"]],  # strings
        [[1, 2], [3]],  # ragged
        np.zeros((2, 2, 2, 2)),  # 4-D
        np.zeros(5),  # 1-D
    ]
    for img in bad_images:
        event = desc.compose_event(data={"img": img}, timestamps={"img": 1.0}, validate=False)
        router("event", event)
    stop = run.compose_stop()
    router("stop", {k: v for k, v in stop.items() if k != "time"})
    assert sink.reasons[1:] == ["bad_dtype", "bad_shape", "bad_shape", "bad_shape", "bad_document"]
    # the stop without a time still stops the run (the RunEngine sends no other), and says why
    assert not sink.frames and [s.run_uid for s in sink.stopped] == [run.start_doc["uid"]]
    assert router.open_runs == [] and "time is not a number" in sink.stopped[0].reason


def colour_run(sink, shape, config=None):
    router = BlueskyRouter(sink, config or BlueskyIngestConfig())
    run = compose_run()
    router("start", run.start_doc)
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key(shape)})
    router("descriptor", desc.descriptor_doc)
    return router, desc


def test_rgb_and_rgba_frames_become_gray_and_are_counted(sink):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 4096, (H, W, 3), dtype=np.uint16)
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint16)], axis=2)
    for shape, img in (((H, W, 3), rgb), ((H, W, 4), rgba), ((1, H, W, 3), rgb[None])):
        router, desc = colour_run(sink, shape)
        router("event", desc.compose_event(data={"img": img}, timestamps={"img": 1.0}))
    assert not sink.rejections
    assert [r for r, _ in sink.conversions] == ["rgb_to_gray", "rgba_to_gray", "rgb_to_gray"]
    gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert len(sink.frames) == 3
    for job in sink.frames:  # alpha ignored
        assert job.frame.shape == (H, W) and job.frame.dtype == np.float32
        np.testing.assert_allclose(job.frame, gray, rtol=1e-5)


def test_colour_frames_refused_by_config_are_counted(sink):
    router, desc = colour_run(sink, (H, W, 3), BlueskyIngestConfig(color_frames="refuse"))
    router("event", desc.compose_event(data={"img": np.zeros((H, W, 3), np.uint8)}, timestamps={"img": 1.0}))
    assert sink.reasons == ["color_frame"] and not sink.frames and not sink.conversions


def test_data_that_disagree_with_their_descriptor_are_refused_as_shape_mismatch(sink):
    router, desc = colour_run(sink, (H, W))
    for img in (np.zeros((H, W, 3), np.uint8),  # was: H frames of W x 3 analysed
                np.zeros((H + 1, W), np.uint16),
                np.zeros((2, H, W), np.uint16)):  # a stack under a single-frame key
        router("event", desc.compose_event(data={"img": img}, timestamps={"img": 1.0}))
    router("event", desc.compose_event(data={"img": np.zeros((1, H, W), np.uint16)}, timestamps={"img": 1.0}))
    assert sink.reasons == ["shape_mismatch"] * 3
    assert "descriptor says [24, 32]" in sink.rejections[0][1]
    assert len(sink.frames) == 1 and sink.frames[0].frame.shape == (H, W)  # a leading 1 is no mismatch


def test_unknown_descriptor_dimensions_match_any_length(sink):
    for shape in ((0, 0), (5, 7, 0)):  # areaDetector says 0 when it does not know
        router, desc = colour_run(sink, shape)
        router("event", desc.compose_event(data={"img": np.ones((5, 7), np.uint8)}, timestamps={"img": 1.0}))
    assert not sink.rejections and [f.frame.shape for f in sink.frames] == [(5, 7), (5, 7)]


def test_bluesky_frames_get_the_raw_inputs_size_limit(sink):
    router, desc = colour_run(sink, (H, W), BlueskyIngestConfig(max_dim=W - 1))
    router("event", desc.compose_event(data={"img": np.zeros((H, W), np.uint16)}, timestamps={"img": 1.0}))
    router2, desc2 = colour_run(sink, (H, W), BlueskyIngestConfig(max_frame_bytes=H * W * 2 - 1))
    router2("event", desc2.compose_event(data={"img": np.zeros((H, W), np.uint16)}, timestamps={"img": 1.0}))
    router2("event", desc2.compose_event(data={"img": np.zeros((H, W), np.uint8)}, timestamps={"img": 1.0}))
    assert sink.reasons == ["oversize", "oversize"]
    assert "max_dim" in sink.rejections[0][1] and "max_frame_bytes" in sink.rejections[1][1]
    assert len(sink.frames) == 1


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_late_joiner_counts_every_missed_event_and_logs_once_per_descriptor(sink):
    clock = Clock()
    router = BlueskyRouter(sink, clock=clock)
    runs = [compose_run() for _ in range(2)]  # both started before the daemon subscribed
    descs = [run.compose_descriptor(name="primary", data_keys={"img": image_key()}) for run in runs]
    for k in range(5):
        if k == 1:  # the first events waited for their descriptors, in vain: counted now
            clock.now += 2.5
            router.tick()
            assert sink.reasons == ["unknown_descriptor"] * 2
        for desc in descs:  # later ones are counted at once, nothing more held
            router("event", desc.compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0}))
    assert sink.reasons == ["unknown_descriptor"] * 10 and sink.logged == ["unknown_descriptor"] * 2
    assert not sink.frames


def test_late_joiner_that_saw_descriptors_logs_once_per_run(sink):
    clock = Clock()
    router = BlueskyRouter(sink, clock=clock)
    run = compose_run()
    descs = [run.compose_descriptor(name=n, data_keys={"img": image_key()}) for n in ("primary", "dark")]
    for desc in descs:
        router("descriptor", desc.descriptor_doc)
    router("event", descs[0].compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0}))
    router("stop", run.compose_stop())
    assert not sink.rejections  # held, waiting for the start
    clock.now += 2.5
    router.tick()
    for desc in descs:
        router("event", desc.compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0}))
    assert sorted(sink.reasons) == ["unknown_descriptor"] * 3 + ["unknown_run"] * 3
    assert len(sink.logged) == 1  # one line for the run, whatever of it came


def test_documents_before_their_start_or_descriptor_are_held_and_replayed_in_order(sink):
    clock = Clock()
    router = BlueskyRouter(sink, clock=clock)
    run = compose_run(metadata={"pixel_size_nm": 8.0})
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key()})
    frames = test_frames(3)
    events = [desc.compose_event(data={"img": f}, timestamps={"img": 1.0}) for f in frames]
    router("event", events[0])  # from a second publisher, before descriptor and start
    router("descriptor", desc.descriptor_doc)
    router("event", events[1])
    clock.now += 1.0
    assert not sink.order and not sink.rejections
    router("start", run.start_doc)  # the descriptor, then the events waiting for it
    router("event", events[2])
    router("stop", run.compose_stop())
    assert sink.order == [("start", run.start_doc["uid"])] + [("frame", run.start_doc["uid"])] * 3 + [
        ("stop", run.start_doc["uid"])]
    assert [j.frame_uid for j in sink.frames] == [e["uid"] for e in events]
    assert [j.metadata.pixel_size_nm for j in sink.frames] == [8.0] * 3
    assert not sink.rejections and [s.exit_status for s in sink.stopped] == ["success"]


def test_held_documents_expire_and_are_bounded(sink):
    clock = Clock()
    router = BlueskyRouter(sink, BlueskyIngestConfig(early_documents_s=1.0, early_documents_max=3), clock=clock)
    runs = [compose_run() for _ in range(5)]
    for run in runs:  # five stops of unknown runs: the two oldest pushed out at once
        router("stop", run.compose_stop())
    assert sink.reasons == ["unknown_run"] * 2 and "pushed out" in sink.rejections[0][1]
    clock.now += 0.5
    router.tick()
    assert len(sink.reasons) == 2
    router("start", runs[4].start_doc)  # its stop was held: the run opens and closes
    assert [s.run_uid for s in sink.stopped] == [runs[4].start_doc["uid"]]
    clock.now += 0.6
    router.tick()
    assert sink.reasons == ["unknown_run"] * 4 and "never came" in sink.rejections[-1][1]


def test_resumed_run_numbers_frames_on_and_counts_the_gap_as_missed(sink, tmp_path):
    from nanoseg_daemon.store import ResultStore

    store = ResultStore(tmp_path / "r.sqlite3")
    first = BlueskyRouter(sink, journal=store)
    run = compose_run(metadata={"pixel_size_nm": 4.0})
    desc = run.compose_descriptor(name="primary", data_keys={"img": image_key()})
    events = [desc.compose_event(data={"img": test_frames(1)[0]}, timestamps={"img": 1.0}) for _ in range(10)]
    first("start", run.start_doc)
    first("descriptor", desc.descriptor_doc)
    for ev in events[:3]:
        first("event", ev)
    (opened,) = store.open_runs()  # what a restarted daemon reads (no frame stored here: the router only)
    assert opened.start_doc["pixel_size_nm"] == 4.0 and [d["uid"] for d in opened.descriptors] == [desc.descriptor_doc["uid"]]
    sink.clear()
    second = BlueskyRouter(sink, journal=store)
    second.resume(opened.start_doc, opened.descriptors, stored_frames=3)
    for ev in events[7:]:  # events 4..7 went while down
        second("event", ev)
    second("stop", run.compose_stop())
    assert [f.seq_num for f in sink.frames] == [4, 5, 6] and sink.started[0].metadata.pixel_size_nm == 4.0
    (stopped,) = sink.stopped
    assert stopped.rejected == {"missed_while_down": 4} and "4 frames missed" in stopped.reason
    assert sink.reasons == []
    store.close()


def test_a_malformed_uid_is_counted_not_held(sink):
    router = BlueskyRouter(sink)
    router("event", {"uid": "e", "descriptor": ["not", "a", "uid"], "time": 1.0, "data": {}, "timestamps": {}})
    router("event", {"uid": "e", "descriptor": 7, "time": 1.0, "data": {}, "timestamps": {}})
    router("datum", {"resource": 5, "datum_id": "x/0", "datum_kwargs": {}})
    assert sink.reasons == ["bad_document", "unknown_descriptor", "unknown_resource"]
