"""Hostile bluesky documents through a real bluesky 0MQ Proxy into a running daemon's SUB input.

A seeded stream of wire garbage, undecodable payloads, random msgpack, invalid UTF-8 JSON,
pickles (plain, and smuggled as msgpack_numpy object arrays), documents out of order, duplicate
uids and broken images, with valid image runs in between: 3 000 hostile messages over msgpack
and 1 500 over JSON. PUB -> proxy -> SUB drops at its high-water marks, so the sender goes in
batches and waits for each batch to be counted. Documents waiting for a uid that never comes are
held (``ingest.bluesky.early_documents_s``) 0.1 s here, not the default 2 s, before they are counted.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq

from nanoseg.control_client import control_request
from nanoseg_daemon.store import ResultReader, default_path
from tests.daemon.ingest_fixtures import start_proxy
from tests.hardening.hardening_fixtures import (
    Metrics,
    Pusher,
    by_reason,
    small_frame,
    start_lean_service,
    subtract,
    svc_metrics,
    total,
    wait_counts,
    wait_for,
)
from tests.hardening.hostile import BlueskyEncoder, Msg, bluesky_single, bluesky_stateful, image_run

PREFIX = b"fz"
REJECTED, FAILED = "nanoseg_messages_rejected_total", "nanoseg_frames_failed_total"
BATCH = 200
VALID_RUNS, FRAMES_PER_RUN = 3, 4
# Documents that refer to a run, descriptor or resource never seen are held this long, then counted
# (the default 2 s would hold up every batch; one publisher keeps its order, so nothing comes late)
EARLY_HOLD_S = "0.1"


def counts(m: Metrics) -> dict[str, dict[str, int]]:
    return {REJECTED: by_reason(m, REJECTED), FAILED: by_reason(m, FAILED)}


def build_stream(enc: BlueskyEncoder, n_hostile: int, pwned: Path, seed: int) -> tuple[list[Msg], list[list[str]]]:
    """Hostile scenarios until ``n_hostile`` hostile messages, valid image runs spread in between."""
    rng = np.random.default_rng(seed)
    cats = {**bluesky_single(enc, pwned), **bluesky_stateful(enc)}
    names = sorted(cats)
    scenarios = [cats[n](rng) for n in names]  # every category at least once
    hostile = sum(m.hostile for s in scenarios for m in s)
    while hostile < n_hostile:
        s = cats[names[int(rng.integers(len(names)))]](rng)
        scenarios.append(s)
        hostile += sum(m.hostile for m in s)
    rng.shuffle(scenarios)  # type: ignore[arg-type]
    valid_uids = []
    for k in range(VALID_RUNS):
        msgs, uids = image_run(enc, [small_frame(100 * k + j) for j in range(FRAMES_PER_RUN)])
        scenarios.insert((k + 1) * len(scenarios) // (VALID_RUNS + 1), msgs)
        valid_uids.append(uids)
    return [m for s in scenarios for m in s], valid_uids


@pytest.mark.parametrize(("serializer", "n_hostile"), [("msgpack", 3000), ("json", 1500)])
def test_bluesky_input_counts_every_hostile_document_and_processes_every_valid_frame(
    tmp_path: Path, trained_model_path: Path, serializer: str, n_hostile: int
) -> None:
    pwned = tmp_path / "pwned"
    enc = BlueskyEncoder(PREFIX, serializer)
    stream, valid_uids = build_stream(enc, n_hostile, pwned, seed=len(serializer))
    hostile = [m for m in stream if m.hostile]
    assert len(hostile) >= n_hostile
    in_port, out_port = start_proxy()
    svc = start_lean_service(tmp_path / "state", trained_model_path, **{
        "ingest.raw.enabled": "false", "ingest.bluesky.enabled": "true",
        "ingest.bluesky.address": out_port, "ingest.bluesky.prefix": PREFIX.decode(),
        "ingest.bluesky.subscribe_all": "true", "ingest.bluesky.serializer": serializer,
        "ingest.bluesky.early_documents_s": EARLY_HOLD_S,
        "queue.block_timeout_s": "300",  # block: never a frame dropped (queue_full) on a loaded machine
    })
    assert svc.summary_pub is not None
    summaries = Pusher(None, svc.summary_pub.address)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.connect(in_port)
    try:
        def probe() -> bool:  # 0MQ's slow joiner, twice: PUB -> proxy -> SUB
            pub.send(enc.message("frobnicate", {}))
            time.sleep(0.05)
            return by_reason(svc_metrics(svc), REJECTED).get("unknown_document", 0) > 0

        wait_for(probe, 20, "the daemon to hear the proxy")
        time.sleep(0.3)  # in-flight probes land before the baseline
        base = svc_metrics(svc)
        base_counts = counts(base)
        base_total = total(base, REJECTED) + total(base, FAILED)

        t0 = time.monotonic()
        expected = 0
        for start in range(0, len(stream), BATCH):
            batch = stream[start:start + BATCH]
            for m in batch:
                pub.send(m.parts[0])
            expected += sum(len(m.rejected) + len(m.failed) for m in batch)
            m = wait_counts(lambda: svc_metrics(svc), (REJECTED, FAILED), base_total + expected, timeout=60)
            got = total(m, REJECTED) + total(m, FAILED) - base_total
            assert got == expected, f"after {start + len(batch)} messages: counted {got}, expected {expected}"
        sent_s = time.monotonic() - t0

        n_valid = VALID_RUNS * FRAMES_PER_RUN
        got_summaries = summaries.summaries(n_valid, timeout_s=120)
        m = wait_counts(lambda: svc_metrics(svc), ("nanoseg_frames_processed_total",), n_valid, timeout=30)
        after = counts(m)
        assert subtract(after[REJECTED], base_counts[REJECTED]) == dict(Counter(r for x in hostile for r in x.rejected))
        assert subtract(after[FAILED], base_counts[FAILED]) == dict(Counter(r for x in hostile for r in x.failed))
        assert m["nanoseg_frames_processed_total"][""] == n_valid
        assert sorted(s["frame_uid"] for s in got_summaries) == sorted(u for run in valid_uids for u in run)
        status = control_request(svc.control.address, {"command": "status"}, timeout_s=10)
        assert status["ok"] and status["result"]["stages_alive"] and svc.ingest.running
        print(f"\n{serializer}: {len(stream)} messages ({len(hostile)} hostile) in {sent_s:.1f} s, "
              f"{len(Counter(x.category for x in hostile))} categories")
    finally:
        pub.close(0)
        ctx.term()
        summaries.close()
        assert svc.stop()
    assert not pwned.exists()
    reader = ResultReader(default_path(tmp_path / "state"))
    stored = {r.run_uid: r.frame_count for r in reader.runs() if r.frame_count}
    assert len(stored) == VALID_RUNS and set(stored.values()) == {FRAMES_PER_RUN}
    assert sorted([f.frame_uid for f in reader.frames(u)] for u in stored) == sorted(valid_uids)
