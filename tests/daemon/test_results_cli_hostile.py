"""``nanoseg results`` against hostile input: SQLite files that are not result stores, outputs that
cannot be written, an earlier export in the way, run metadata in any script under any locale.
Each gives one line naming the problem and exit 2 (or works), never a traceback or a partial table."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseg.cli import main
from nanoseg_daemon.contracts import FrameMetadata, RunStarted
from nanoseg_daemon.store import ResultStore
from tests.daemon.results_fixtures import frame_result

UNICODE_UID = "run-échantillon-☃-1"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A store with run ``aaaa-1111`` (frame metadata not ASCII) and run UNICODE_UID."""
    path = tmp_path / "results.sqlite3"
    store = ResultStore(path)
    for uid in ("aaaa-1111", UNICODE_UID):
        store.add_run(RunStarted(uid, FrameMetadata(pixel_size_nm=5.0), {"uid": uid}, 1_700_000_000.0), "m")
    frame = frame_result("aaaa-1111", 1)
    store.add_frame(dataclasses.replace(frame, metadata={**frame.metadata, "sample": "V₂O₅, \"grown\"\nÅ"}))
    store.add_frame(frame_result(UNICODE_UID, 1))
    store.close()
    return path


def results(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["results", *args])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    return rc, err


def test_an_sqlite_file_that_is_not_a_result_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    for path in (empty, other):
        rc, err = results(capsys, "list", "--db", str(path))
        assert rc == 2 and f"{path}: not a nanoseg result store" in err


@pytest.mark.parametrize("command", ["export", "report"])
def test_an_out_that_cannot_be_a_directory(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           command: str) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = results(capsys, command, "aaaa", "--db", str(db), "--out", str(f))
    assert rc == 2 and f"--out {f}: exists and is not a directory" in err
    rc, err = results(capsys, command, "aaaa", "--db", str(db), "--out", str(f / "sub"))
    assert rc == 2 and f"cannot write {f / 'sub'}: Not a directory" in err


def test_a_failed_export_leaves_the_earlier_one_whole(db: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["results", "export", "aaaa", "--db", str(db), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    os.remove(out / "run.csv")
    (out / "run.csv").mkdir()  # in the way of the last table
    del before["run.csv"]
    rc, err = results(capsys, "export", UNICODE_UID[:4], "--db", str(db), "--out", str(out))
    assert rc == 2 and "run.csv there is a directory" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no mix, no temp file


def test_export_and_list_under_an_ascii_locale(db: Path, tmp_path: Path) -> None:
    """A C locale without UTF-8 coercion (a cron job, a minimal container): the tables are UTF-8
    all the same, and a run uid the terminal cannot show is escaped rather than fatal."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "OMP_NUM_THREADS": "1"}
    env.pop("LANG", None)
    env.pop("PYTHONIOENCODING", None)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "nanoseg", "results", "export", "run-", "--db", str(db),
                           "--out", str(out)], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert f"{UNICODE_UID},{UNICODE_UID}-ev1," in (out / "frames.csv").read_text(encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "nanoseg", "results", "list", "--db", str(db)],
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"run-\\xe9chantillon-\\u2603-1" in done.stdout


def test_a_failed_report_leaves_the_earlier_one_whole(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure and the page are written whole beside the earlier report, then both renamed: a
    failure while writing them, or a directory where one goes, leaves the earlier pair as it was
    and no temp file."""
    from nanoseg_daemon import results_report

    out = tmp_path / "out"
    assert main(["results", "report", "aaaa", "--db", str(db), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"report.png", "report.html"}

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device", str(out / "report.html"))

    monkeypatch.setattr(results_report, "report_html", full_disk)  # the figure is written, the page fails
    rc, err = results(capsys, "report", UNICODE_UID[:4], "--db", str(db), "--out", str(out))
    assert rc == 2 and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier figure too, no temp file
    monkeypatch.undo()
    os.remove(out / "report.html")
    (out / "report.html").mkdir()
    rc, err = results(capsys, "report", "aaaa", "--db", str(db), "--out", str(out))
    assert rc == 2 and "report.html there is a directory; nothing was written" in err
    assert (out / "report.png").read_bytes() == before["report.png"]
