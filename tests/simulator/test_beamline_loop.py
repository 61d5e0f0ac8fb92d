"""The beamline loop over real sockets: simulated microscope (RunEngine + ophyd) -> bluesky
Publisher -> Proxy -> daemon Service -> JSON summaries -> NanosegStats read inside plans, and the
daemon's analysis runs (with the growth alarms stream) back through the proxy.

Tolerance: per frame, |count - truth| <= max(2, 30 % of the true count) (truth: wires deposited in
the field, from the simulation); the plan-level checks compare documents with the daemon's store
exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import pytest
import zmq
from bluesky import RunEngine
from event_model import DocumentNames, schema_validators

from nanoseg.codec import msgpack_loads
from nanoseg_daemon.ophyd_stats import NanosegStats
from nanoseg_daemon.plans import GrowthStop, adaptive_exposure, next_exposure
from nanoseg_daemon.service import Service
from nanoseg_daemon.store import ResultReader, default_path
from nanoseg_sim.run import Simulation, TruthRecorder, load_simulator_config, make_publisher
from tests.daemon.ingest_fixtures import start_proxy
from tests.daemon.service_fixtures import start_service

Docs = list[tuple[str, dict[str, Any]]]


def within_tolerance(count: int, truth: int) -> bool:
    return abs(count - truth) <= max(2, 0.3 * truth)


class ProxyCollector:
    """Every document that passes through the proxy (a SUB on its output, decoded with msgpack)."""

    def __init__(self, address: str) -> None:
        self.docs: Docs = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(address)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                _prefix, name, payload = self._sock.recv().split(b" ", 2)
                with self._lock:
                    self.docs.append((name.decode(), msgpack_loads(payload)))

    def analysis_of(self, raw_uid: str, timeout: float = 60.0) -> Docs:
        """The analysis run of raw run ``raw_uid``, once its stop has arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                docs = list(self.docs)
            start = next((d for n, d in docs if n == "start" and d.get("raw_run_uid") == raw_uid), None)
            if start is not None:
                descs = {d["uid"] for n, d in docs if n == "descriptor" and d["run_start"] == start["uid"]}
                run = [(n, d) for n, d in docs if d is start or d.get("run_start") == start["uid"]
                       or (n == "event" and d["descriptor"] in descs)]
                if any(n == "stop" for n, _ in run):
                    return run
            time.sleep(0.1)
        raise AssertionError(f"no complete analysis run of {raw_uid} within {timeout} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


@pytest.fixture(scope="module")
def proxy() -> tuple[str, str]:
    return start_proxy()


@pytest.fixture(scope="module")
def collector(proxy: tuple[str, str]) -> Iterator[ProxyCollector]:
    c = ProxyCollector(proxy[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def daemon(proxy: tuple[str, str], trained_model_path: Path, tmp_path_factory: pytest.TempPathFactory,
           collector: ProxyCollector) -> Iterator[Service]:
    proxy_in, proxy_out = proxy
    svc = start_service(tmp_path_factory.mktemp("state"), trained_model_path, **{
        "model.engine": "onnxruntime", "ingest.raw.enabled": "false",
        "ingest.bluesky.enabled": "true", "ingest.bluesky.address": proxy_out,
        "publish.bluesky.bind": "false", "publish.bluesky.address": proxy_in,
        "growth.ewma_alpha": "1.0",
        "growth.rules": "[{name: wires_present, quantity: count, statistic: value, above: 0.5}]",
    })
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def publisher(proxy: tuple[str, str]) -> Iterator[Any]:
    pub = make_publisher(proxy[0], connect_wait_s=0.5)
    yield pub
    pub.close()


@pytest.fixture
def stats(daemon: Service) -> Iterator[NanosegStats]:
    assert daemon.summary_pub is not None
    s = NanosegStats(daemon.summary_pub.address, name="nanoseg")
    s.timeout_s.put(60.0)
    time.sleep(0.3)  # 0MQ slow joiner: the SUB must be connected before the first summary
    yield s
    s.close()


@pytest.fixture
def run(publisher: Any) -> Any:
    """Run a plan on a fresh RunEngine publishing to the proxy; returns (documents, truth)."""

    def go(plan: Any) -> tuple[Docs, TruthRecorder]:
        RE = RunEngine({}, context_managers=[])
        docs: Docs = []
        truth = TruthRecorder()
        RE.subscribe(lambda n, d: docs.append((n, d)))
        RE.subscribe(truth)
        RE.subscribe(publisher)
        RE(plan)
        return docs, truth

    return go


def stream(docs: Docs, name: str) -> list[dict[str, Any]]:
    uids = {d["uid"] for n, d in docs if n == "descriptor" and d["name"] == name}
    return [d for n, d in docs if n == "event" and d["descriptor"] in uids]


def growth_sim(**sets: Any) -> Simulation:
    return Simulation.build(load_simulator_config("growth", {k: str(v) for k, v in sets.items()}))


def test_stats_read_inside_the_plan_match_the_daemon_and_the_truth(daemon: Service, stats: NanosegStats, run: Any,
                                                                   collector: ProxyCollector) -> None:
    sim = growth_sim(seed=5, **{"monitor.max_frames": 4, "monitor.target_mean_length_nm": 1e6})
    plan = bpp.monitor_during_wrapper(sim.monitor_plan(stats), [stats.count])
    docs, truth = run(plan)
    (start,) = [d for n, d in docs if n == "start"]
    (stop,) = [d for n, d in docs if n == "stop"]
    assert (stop["exit_status"], stop["reason"]) == ("success", "max_frames")
    frames, analysed = stream(docs, "primary"), stream(docs, "nanoseg")
    assert len(frames) == len(analysed) == 4
    # the plan's own documents hold, for each frame, the daemon's analysis of exactly that frame
    assert [e["data"]["nanoseg_seq_num"] for e in analysed] == [1, 2, 3, 4]
    assert [e["data"]["nanoseg_frame_uid"] for e in analysed] == [e["uid"] for e in frames]
    assert {e["data"]["nanoseg_run_uid"] for e in analysed} == {start["uid"]}
    stored = ResultReader(default_path(daemon.cfg.state_dir)).frames(start["uid"])
    for e, rec in zip(analysed, stored, strict=True):
        assert e["data"]["nanoseg_count"] == rec.count
        assert e["data"]["nanoseg_length_nm_mean"] == pytest.approx(rec.summary["stats"]["length_nm"]["mean"])
        assert e["data"]["nanoseg_model_version"] == rec.model_version
    for e, t in zip(analysed, truth.rows, strict=True):
        assert within_tolerance(e["data"]["nanoseg_count"], t["truth_count"]), (e["data"]["nanoseg_count"], t)
    assert [e["data"]["cam_truth_count"] for e in frames] == [t["truth_count"] for t in truth.rows]
    # bps.monitor: the count signal's updates became a stream of the same run
    monitored = [e["data"]["nanoseg_count"] for e in stream(docs, "nanoseg_count_monitor")]
    assert monitored[-4:] == [e["data"]["nanoseg_count"] for e in analysed]
    # bps.read outside any trigger gives the latest summary
    got: list[Any] = []
    RunEngine({}, context_managers=[])(_read_into(stats, got))
    assert got[0]["nanoseg_frame_uid"]["value"] == frames[-1]["uid"]
    # the daemon's analysis run came back through the proxy, with the alarms stream, all valid
    analysis = collector.analysis_of(start["uid"])
    for name, doc in analysis:
        schema_validators[DocumentNames[name]].validate(doc)
    assert [e["data"]["count"] for e in stream(analysis, "primary")] == [e["data"]["nanoseg_count"] for e in analysed]
    alarms = [e["data"] for e in stream(analysis, "alarms")]
    assert alarms and (alarms[0]["rule"], alarms[0]["state"]) == ("wires_present", "raised")


def _read_into(stats: NanosegStats, out: list[Any]) -> Any:
    reading = yield from bps.read(stats)
    out.append(reading)


@pytest.mark.parametrize("case", ["target", "stall"])
def test_growth_plan_stops_on_target_or_stall(stats: NanosegStats, run: Any, case: str) -> None:
    if case == "target":
        sim = growth_sim(seed=0, **{"growth.interval_s": 60, "monitor.target_mean_length_nm": 450,
                                    "monitor.max_frames": 12, "monitor.stall_rate_nm_per_frame": 0})
    else:  # nothing grows or nucleates: the measured length only jitters
        sim = growth_sim(seed=0, **{"growth.growth_rate_nm_per_s": "{low: 0, high: 0}",
                                    "growth.nucleation_per_min": 0, "growth.initial_length_nm": 600,
                                    "monitor.target_mean_length_nm": 1e6, "monitor.stall_rate_nm_per_frame": 40,
                                    "monitor.stall_frames": 3, "monitor.max_frames": 12})
    docs, truth = run(sim.monitor_plan(stats))
    (stop,) = [d for n, d in docs if n == "stop"]
    lengths = [e["data"]["nanoseg_length_nm_mean"] for e in stream(docs, "nanoseg")]
    assert stop["exit_status"] == "success"
    assert stop["reason"] == ("target_reached" if case == "target" else "stalled")
    assert len(lengths) == len(truth.rows) < 12
    # the decision replayed from the documented values stops at the same frame, not earlier
    m = sim.cfg.monitor
    replay = GrowthStop(m.target_mean_length_nm, m.stall_rate_nm_per_frame, m.stall_frames, m.smoothing)
    verdicts = [replay.update(x) for x in lengths]
    assert verdicts[:-1] == [None] * (len(lengths) - 1) and verdicts[-1] == stop["reason"]
    if case == "target":
        assert replay.smoothed[-1] >= 450
        assert truth.rows[-1]["truth_visible_length_nm_mean"] > 0.75 * 450  # the sample really grew
    else:
        assert len(lengths) == 4  # the first frame has no rate, then 3 stalled frames


def test_hdf5_frames_through_resource_and_datum(daemon: Service, run: Any, tmp_path: Path) -> None:
    cfg = load_simulator_config("raster", {"raster.nx": "2", "raster.ny": "1", "hdf5_dir": str(tmp_path), "seed": "3"})
    sim = Simulation.build(cfg)
    docs, truth = run(sim.plain_plan())
    assert [n for n, _ in docs].count("resource") == 2 and len(list(tmp_path.glob("*.h5"))) == 2
    uid = truth.run_uid
    assert uid is not None
    reader = ResultReader(default_path(daemon.cfg.state_dir))
    deadline = time.monotonic() + 60
    while reader.frame_count(uid) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    stored = reader.frames(uid)
    assert [r.seq_num for r in stored] == [1, 2]
    for rec, t in zip(stored, truth.rows, strict=True):
        assert rec.frame_uid == t["frame_uid"]
        assert within_tolerance(rec.count, t["truth_count"]), (rec.count, t)


def test_adaptive_exposure_acts_on_the_documented_counts(stats: NanosegStats, run: Any) -> None:
    sim = growth_sim(seed=2, **{"detector.exposure_s": 0.05})
    md = {k: v for k, v in sim.start_metadata(with_i0=False).items()}
    plan = adaptive_exposure(sim.microscope.camera, stats, 3, min_count=3, stable_frames=2, tolerance=1,
                             limits=(0.01, 0.4), md=md)
    docs, _ = run(plan)
    exposures = [e["data"]["cam_exposure_time"] for e in stream(docs, "nanoseg")]
    counts = [e["data"]["nanoseg_count"] for e in stream(docs, "nanoseg")]
    assert len(exposures) == len(counts) == 3 and exposures[0] == 0.05
    for k in range(2):
        expected = next_exposure(counts[: k + 1], exposures[k], min_count=3, stable_frames=2, tolerance=1,
                                 limits=(0.01, 0.4))
        assert exposures[k + 1] == pytest.approx(expected)
    assert float(sim.microscope.camera.exposure_time.get()) == pytest.approx(
        next_exposure(counts, exposures[2], min_count=3, stable_frames=2, tolerance=1, limits=(0.01, 0.4)))
