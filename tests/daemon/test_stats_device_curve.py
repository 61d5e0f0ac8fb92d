"""NanosegStats against a real daemon whose summary socket is a CurveZMQ server, read by a real
RunEngine: the authorised client key gets the frame's statistics; an unauthorised key, or a server
key that is not the daemon's, ends the plan with a timeout that says CURVE is on and the key may not
be authorised; a key file that cannot be used fails the constructor naming the file.

    raw frames (plain PUSH) --> daemon (engine null) --PUB/CURVE--> NanosegStats (client keys) --> RunEngine

Keys are zmq.auth certificates made as tests/hardening/test_curve_auth.py makes them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import pytest
import zmq
from bluesky.utils import FailedStatus

from nanoseg_daemon.ophyd_stats import NanosegStats, NanosegStatsTimeout
from nanoseg_daemon.service import Service
from tests.daemon.service_fixtures import run_plan as run
from tests.daemon.service_fixtures import start_service
from tests.hardening.hardening_fixtures import make_certificates, raw_frame_message, small_frame


@dataclass
class CurveDaemon:
    svc: Service
    keys: dict[str, tuple[Path, Path]]  # name -> (public file, secret file)
    push: zmq.Socket[Any]

    @property
    def summary_address(self) -> str:
        assert self.svc.summary_pub is not None
        return self.svc.summary_pub.address

    def device(self, client: str, server: str = "server", timeout_s: float = 60.0) -> NanosegStats:
        """A device with ``client``'s key pair and ``server``'s public key (the daemon's: "server")."""
        stats = NanosegStats(self.summary_address, name="nanoseg", client_secret_key=self.keys[client][1],
                             server_public_key=self.keys[server][0])
        stats.timeout_s.put(timeout_s)
        return stats

    def send_frame(self, run: str, seq: int) -> None:
        self.push.send_multipart(raw_frame_message(seq, small_frame(seq), run=run))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, trained_model_path: Path) -> Iterator[CurveDaemon]:
    d = tmp_path_factory.mktemp("stats_curve")
    keys = make_certificates(d / "keys", "server", "good", "bad")
    authorized = d / "authorized"
    authorized.mkdir()
    shutil.copy(keys["good"][0], authorized)  # the summary socket admits only "good"
    svc = start_service(d / "state", trained_model_path, **{
        "model.engine": "null", "publish.curve.server_secret_key": keys["server"][1],
        "publish.curve.authorized_clients_dir": authorized})
    ctx: zmq.Context[Any] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    assert svc.ingest.raw_address
    push.connect(svc.ingest.raw_address)
    try:
        yield CurveDaemon(svc, keys, push)
    finally:
        push.close(0)
        ctx.term()
        assert svc.stop()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_after_frame(stats: NanosegStats, send: Callable[[], None]) -> Any:
    """Trigger the device, have the detector send a frame, wait for its analysis and read it."""
    @bpp.run_decorator()
    def inner() -> Any:
        yield from bps.trigger(stats, group="nanoseg")  # trigger_mode "next": the next summary
        send()
        yield from bps.wait(group="nanoseg")
        yield from bps.create()
        yield from bps.read(stats)
        yield from bps.save()

    yield from inner()


def test_the_authorised_key_reads_the_daemons_statistics_in_a_plan(daemon: CurveDaemon) -> None:
    stats = daemon.device("good")
    try:
        wait_for(lambda: stats.curve_handshakes.get("succeeded", 0) >= 1, "the CURVE handshake")
        time.sleep(0.3)  # the subscription reaches the daemon after the handshake
        stats.expect_run_uid.put("raw:detector:authorised")  # raw run "authorised" of source "detector"
        docs, err = run(read_after_frame(stats, lambda: daemon.send_frame("authorised", 0)))
        assert err is None, err
        (event,) = [d for n, d in docs if n == "event"]
        assert event["data"]["nanoseg_frame_uid"] == "raw:detector:authorised:0"
        assert (event["data"]["nanoseg_run_uid"], event["data"]["nanoseg_seq_num"]) == ("raw:detector:authorised", 1)
        assert isinstance(event["data"]["nanoseg_count"], int)
        assert stats.curve_handshakes.get("refused", 0) == 0 and stats.ignored == {}
    finally:
        stats.close()


@pytest.mark.parametrize(("client", "server", "handshake"), [
    ("bad", "server", "refused"),  # a key not in authorized_clients_dir
    ("good", "bad", "failed"),  # the authorised key, but a server key that is not the daemon's
])
def test_an_unauthorised_key_ends_the_plan_with_a_timeout_that_says_so(
        daemon: CurveDaemon, client: str, server: str, handshake: str) -> None:
    witness = daemon.device("good")  # shows that the daemon did publish the frame
    stats = daemon.device(client, server, timeout_s=2.0)
    try:
        wait_for(lambda: witness.curve_handshakes.get("succeeded", 0) >= 1, "the witness's handshake")
        wait_for(lambda: bool(stats.curve_handshakes), "the refused handshake")
        time.sleep(0.3)
        run_name = f"intruder-{client}-{server}"
        t0 = time.monotonic()
        docs, err = run(read_after_frame(stats, lambda: daemon.send_frame(run_name, 0)))
        assert time.monotonic() - t0 < 15
        timeout = err.__cause__ if isinstance(err, FailedStatus) else err  # the RunEngine wraps it
        assert isinstance(timeout, NanosegStatsTimeout), err
        msg = str(timeout)
        assert daemon.summary_address in msg and "within 2 s" in msg and "no summary received" in msg
        assert "CURVE is on" in msg and "the key may not be authorised" in msg
        assert str(daemon.keys[client][1]) in msg and str(daemon.keys[server][0]) in msg
        assert f"CURVE handshakes: {handshake}" in msg
        assert "succeeded" not in stats.curve_handshakes
        (stop,) = [d for n, d in docs if n == "stop"]
        assert stop["exit_status"] == "fail"
        assert stats.latest is None
        wait_for(lambda: witness.latest is not None and witness.latest["run_uid"] == f"raw:detector:{run_name}",
                 "the authorised device to see the frame")
    finally:
        stats.close()
        witness.close()


def test_no_key_against_a_curve_daemon_times_out_like_a_silent_daemon(daemon: CurveDaemon) -> None:
    """Backward compatible: no key arguments is a plain subscriber, which a CURVE daemon never feeds."""
    stats = NanosegStats(daemon.summary_address, name="nanoseg")
    stats.timeout_s.put(1.0)
    try:
        assert stats.curve is None
        _docs, err = run(read_after_frame(stats, lambda: daemon.send_frame("plain", 0)))
        timeout = err.__cause__ if isinstance(err, FailedStatus) else err
        assert isinstance(timeout, NanosegStatsTimeout) and "no summary received" in str(timeout)
        assert "CURVE" not in str(timeout)
    finally:
        stats.close()


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("key_files")
    keys = make_certificates(d, "server", "client")
    garbage = d / "garbage.key_secret"
    garbage.write_text("public-key = \"not a key\"\nsecret-key = \"nor this\"\n")
    binary = d / "binary.key_secret"
    binary.write_bytes(b"\xff\xfe\x00 no certificate here")
    return {"server_public": keys["server"][0], "client_public": keys["client"][0],
            "client_secret": keys["client"][1], "garbage": garbage, "binary": binary, "dir": d,
            "missing": d / "missing.key_secret"}


@pytest.mark.parametrize(("client", "server", "match"), [
    ("missing", "server_public", "cannot read client_secret_key {missing}: no such file"),
    ("client_secret", "missing", "cannot read server_public_key {missing}: no such file"),
    ("client_public", "server_public", "client_secret_key {client_public} holds no secret-key"),
    ("garbage", "server_public", "client_secret_key {garbage}: its public-key is not a 40-character Z85"),
    ("client_secret", "garbage", "server_public_key {garbage}: its public-key is not a 40-character Z85"),
    ("binary", "server_public", "cannot read client_secret_key {binary}"),
    ("dir", "server_public", "cannot read client_secret_key {dir}"),
])
def test_a_key_file_that_cannot_be_used_is_named_at_construction(
        key_files: dict[str, Path], client: str, server: str, match: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        NanosegStats("tcp://127.0.0.1:5590", name="nanoseg", client_secret_key=key_files[client],
                     server_public_key=key_files[server])
    assert time.monotonic() - t0 < 2
    assert str(info.value).startswith("nanoseg: ")
    assert match.format(**{k: str(v) for k, v in key_files.items()}) in str(info.value)


@pytest.mark.parametrize("given", ["client_secret_key", "server_public_key"])
def test_one_key_without_the_other_is_refused(key_files: dict[str, Path], given: str) -> None:
    path = key_files["client_secret" if given == "client_secret_key" else "server_public"]
    with pytest.raises(ValueError, match=f"client_secret_key and server_public_key go together.*only {given}"):
        NanosegStats("tcp://127.0.0.1:5590", name="nanoseg", **{given: path})


def test_key_paths_may_be_strings(key_files: dict[str, Path]) -> None:
    stats = NanosegStats("tcp://127.0.0.1:5590", name="nanoseg", client_secret_key=str(key_files["client_secret"]),
                         server_public_key=str(key_files["server_public"]))
    try:
        assert stats.curve is not None and stats.curve.client_secret_key == key_files["client_secret"]
    finally:
        stats.close()
