"""Hostile raw frames over the real PULL socket of a running daemon.

6 000 malformed messages (plus three real 720 kB oversize buffers) from a seeded generator, with
valid 64 x 64 frames and re-sent frame ids in between. Every hostile message must be counted
under the reason written next to it in hostile.py, every valid frame stored and published once,
and the pickle payloads must never run.
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np

from nanoseg.control_client import control_request
from nanoseg_daemon.store import ResultReader, default_path
from tests.hardening.hardening_fixtures import (
    Pusher,
    by_reason,
    raw_frame_message,
    small_frame,
    start_lean_service,
    svc_metrics,
    wait_counts,
)
from tests.hardening.hostile import (
    MAX_FRAME_BYTES,
    Msg,
    hostile_stream,
    raw_categories,
    raw_oversize_buffer,
    touching_pickle,
)

N_HOSTILE = 6000
N_VALID = 20
RESENT = (3, 11)  # frame ids sent a second time later on
REJECTED, FAILED = "nanoseg_messages_rejected_total", "nanoseg_frames_failed_total"


def test_the_pickle_payload_would_create_its_file(tmp_path: Path) -> None:
    """The hostile pickles are live ammunition: unpickling one creates the file."""
    target = tmp_path / "created"
    pickle.loads(touching_pickle(target, 2))
    assert target.exists()


def test_raw_input_counts_every_hostile_message_and_processes_every_valid_frame(
    tmp_path: Path, trained_model_path: Path
) -> None:
    pwned = tmp_path / "pwned"
    rng = np.random.default_rng(20261126)
    hostile: list[Msg] = [*hostile_stream(raw_categories(pwned), N_HOSTILE, rng), *[raw_oversize_buffer()] * 3]
    assert len({m.category for m in hostile}) == len(raw_categories(pwned)) + 1
    valid = {i: raw_frame_message(i, small_frame(i), run="fuzz") for i in range(N_VALID)}
    stream: list[list[bytes] | Msg] = list(hostile)
    for k, i in enumerate([*range(N_VALID), *RESENT]):  # valid frames spread evenly, in order
        stream.insert((k + 1) * len(hostile) // (N_VALID + len(RESENT) + 1) + k, valid[i])

    # queue policy block: ingest waits for space instead of dropping (queue_full) however long a
    # loaded machine takes over the valid frames ahead
    svc = start_lean_service(tmp_path / "state", trained_model_path,
                             **{"ingest.raw.max_frame_bytes": MAX_FRAME_BYTES, "queue.block_timeout_s": "300"})
    assert svc.ingest.raw_address and svc.summary_pub
    client = Pusher(svc.ingest.raw_address, svc.summary_pub.address)
    try:
        t0 = time.monotonic()
        for item in stream:
            client.send(item.parts if isinstance(item, Msg) else item)
        sent_s = time.monotonic() - t0
        want_rejected = Counter(r for m in hostile for r in m.rejected)
        want_failed = Counter(r for m in hostile for r in m.failed)
        summaries = client.summaries(N_VALID, timeout_s=120)
        # every message counted once: a hostile one as rejected or failed, a valid one as processed or
        # (re-sent) dropped; one wait on the sum, so a frame failing behind the last valid one is not missed
        m = wait_counts(lambda: svc_metrics(svc), (REJECTED, FAILED, "nanoseg_frames_processed_total",
                                                   "nanoseg_frames_dropped_total"),
                        len(hostile) + N_VALID + len(RESENT), timeout=120)

        assert by_reason(m, REJECTED) == dict(want_rejected)
        assert by_reason(m, FAILED) == dict(want_failed)
        assert sum(want_rejected.values()) + sum(want_failed.values()) == len(hostile) == N_HOSTILE + 3
        n_frames_passing_ingest = sum(want_failed.values()) + N_VALID + len(RESENT)
        assert m["nanoseg_frames_received_total"][""] == n_frames_passing_ingest
        assert m["nanoseg_frames_processed_total"][""] == N_VALID
        assert by_reason(m, "nanoseg_frames_dropped_total") == {"duplicate": len(RESENT)}
        assert sorted(s["frame_uid"] for s in summaries) == sorted(f"raw:detector:fuzz:{i}" for i in range(N_VALID))
        status = control_request(svc.control.address, {"command": "status"}, timeout_s=10)
        assert status["ok"] and status["result"]["processed"] == N_VALID and status["result"]["stages_alive"]
        assert svc.ingest.running
        print(f"\n{len(stream)} messages sent in {sent_s:.1f} s; {N_HOSTILE + 3} hostile, counted by reason: "
              f"{dict(want_rejected)} + failed {dict(want_failed)}")
    finally:
        client.close()
        assert svc.stop()
    assert not pwned.exists()
    frames = ResultReader(default_path(tmp_path / "state")).frames("raw:detector:fuzz")
    assert [f.frame_uid for f in frames] == [f"raw:detector:fuzz:{i}" for i in range(N_VALID)]
