"""Sinks under failure, with real components: a Tiled server that never answers (a real TCP
socket that accepts and stays silent), and a SQLite store whose file is removed or replaced while
the daemon writes it."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanoseg_daemon.config import load_daemon_config
from nanoseg_daemon.contracts import RunStopped
from nanoseg_daemon.metrics import DaemonMetrics
from nanoseg_daemon.sinks import SinkChain, StoreSink
from nanoseg_daemon.store import ResultReader, ResultStore, StoreError
from tests.daemon.test_sinks import result, start, value

pytest.importorskip("tiled.client", reason="tiled not installed (pip install -e '.[dev]')")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung Tiled server): its URL."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        done.set()
        thread.join(2)
        for conn in held:
            conn.close()
        srv.close()


def tiled_chain(tmp_path: Path, url: str, timeout_s: float) -> tuple[SinkChain, DaemonMetrics]:
    from nanoseg_daemon.tiled_sink import TiledSink

    cfg = load_daemon_config(None, {"tiled.uri": url, "tiled.timeout_s": str(timeout_s),
                                    "tiled.retry_after_s": "30"}, environ={})
    assert cfg.tiled is not None
    m = DaemonMetrics()
    sinks = [StoreSink(ResultStore(tmp_path / "results.sqlite3"), lambda: "v", m), TiledSink(cfg.tiled, lambda: ("v", {}))]
    return SinkChain(sinks, m, max_pending=100), m


def test_a_hung_tiled_server_stalls_the_output_for_its_timeout_once_not_tileds_retries(
        tmp_path: Path, silent_server: str) -> None:
    # tiled's client retries a request that timed out (10 attempts within 45 s by default): the
    # output stage, and the store and bus with it, waited all of that at timeout_s = 0.5 s
    chain, m = tiled_chain(tmp_path, silent_server, timeout_s=0.5)
    t0 = time.monotonic()
    chain.put(start("r"))
    for seq in range(1, 6):
        chain.put(result("r", seq))
    chain.put(RunStopped("r", "success", time.time()))
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, f"the output stage stalled {elapsed:.1f} s"
    assert chain.pending == 0 and chain.open_runs == []
    reader = ResultReader(tmp_path / "results.sqlite3")
    assert reader.frame_count("r") == 5 and reader.runs()[0].exit_status == "success"
    # every item Tiled did not get is counted: the start, 5 frames, the stop
    assert value(m, "nanoseg_sink_errors_total", sink="tiled", reason="tiled_unreachable") == 2
    assert value(m, "nanoseg_sink_errors_total", sink="tiled", reason="tiled_no_run") == 5
    chain.close()


def test_housekeeping_retry_never_waits_for_a_sink_that_is_writing(tmp_path: Path, silent_server: str) -> None:
    # the housekeeping thread pings the systemd watchdog (WatchdogSec=30); its retry waited for the
    # chain's lock as long as a slow sink held the output stage, and the daemon was killed
    chain, _ = tiled_chain(tmp_path, silent_server, timeout_s=2.0)
    out = threading.Thread(target=chain.put, args=(start("r"),))
    out.start()
    time.sleep(0.3)  # the output stage is inside the Tiled call now
    assert chain.pending == 1
    t0 = time.monotonic()
    chain.retry()
    waited = time.monotonic() - t0
    out.join(60)
    assert waited < 0.2, f"retry waited {waited:.1f} s for the output stage"
    chain.close()


def stored(path: Path, run: str) -> list[int]:
    return [f.seq_num for f in ResultReader(path).frames(run)]


def test_a_store_file_removed_with_its_directory_is_made_again_with_every_result(tmp_path: Path) -> None:
    # SQLite (WAL) went on writing into the deleted file: every later result lost, no error
    path = tmp_path / "state" / "results.sqlite3"
    store = ResultStore(path)
    store.add_run(start("r"), "v")
    assert store.add_frame(result("r", 1))
    shutil.rmtree(path.parent)
    assert store.add_frame(result("r", 2))
    assert path.is_file() and stored(path, "r") == [1, 2]
    assert store.add_frame(result("r", 3)) and stored(path, "r") == [1, 2, 3]
    assert not store.add_frame(result("r", 1))  # still refuses what it has
    store.close()
    assert stored(path, "r") == [1, 2, 3]


def test_a_replaced_store_file_holds_results_in_the_chain_until_the_file_is_back(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite3"
    m = DaemonMetrics()
    chain = SinkChain([StoreSink(ResultStore(path), lambda: "v", m)], m, max_pending=100)
    chain.put(start("r"))
    chain.put(result("r", 1))
    aside = tmp_path / "aside.sqlite3"
    os.rename(path, aside)
    shutil.copy(aside, path)  # someone put another file there
    chain.put(result("r", 2))
    assert chain.pending == 1
    assert value(m, "nanoseg_store_errors_total", reason="file_replaced") == 1
    assert stored(path, "r") == [1]  # nothing written into the other file
    os.replace(aside, path)  # the original is back
    chain.retry()
    assert chain.pending == 0 and stored(path, "r") == [1, 2]
    chain.close()


def test_a_store_that_cannot_make_its_file_again_raises_and_keeps_nothing_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "results.sqlite3"
    store = ResultStore(path)
    shutil.rmtree(path.parent)
    path.parent.parent.joinpath("state").write_text("a file where the directory was")
    with pytest.raises(StoreError) as err:
        store.add_frame(result("r", 1))
    assert err.value.reason == "file_missing" and not err.value.permanent
    store.close()


def test_a_store_whose_copy_fails_half_way_leaves_nothing_at_its_path_and_recovers(tmp_path: Path) -> None:
    """The copy that makes a removed file again fails (here: its temporary file cannot be made;
    a full disk does the same): nothing is left at the path, so the next write makes it again
    rather than take a half-written copy for another's file and hold every result for ever."""
    path = tmp_path / "state" / "results.sqlite3"
    store = ResultStore(path)
    store.add_run(start("r"), "v")
    assert store.add_frame(result("r", 1))
    shutil.rmtree(path.parent)
    blocker = path.with_name(f".{path.name}.recreate.tmp")
    blocker.mkdir(parents=True)  # a directory where the copy goes: sqlite cannot open it
    with pytest.raises(StoreError) as err:
        store.add_frame(result("r", 2))
    assert err.value.reason == "file_missing" and not path.exists()
    blocker.rmdir()
    assert store.add_frame(result("r", 2))  # was file_replaced from here on, until a restart
    assert stored(path, "r") == [1, 2] and not blocker.exists()
    store.close()
