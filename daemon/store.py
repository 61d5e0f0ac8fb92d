"""Durable results: runs, frames and particles in one SQLite file, written before any publication.

Durability: WAL journal with ``synchronous=NORMAL`` (the default here). A commit has been written
to the WAL file, though not fsynced, when ``add_frame`` returns, so it survives the daemon crashing,
being killed or restarted by systemd: the guarantee the service promises ("a restart never loses or
duplicates a stored frame"). A power cut or kernel crash can roll back the last commits since the
WAL was last synced, never corrupt the file. ``synchronous="FULL"`` fsyncs every commit and closes
that gap, at one fsync per frame (from well under a millisecond on a local SSD to tens of ms on
network storage); choose it where the state directory's disk and the frame rate allow.

Errors: every failed write raises ``StoreError`` with a short ``reason`` (``disk_full``,
``read_only``, ``io_error``, ``locked``, ...; a metric label) after rolling its transaction back,
so nothing of that frame is stored and earlier rows are intact. The caller keeps the result and
retries ``add_frame`` later; because a stored frame_uid is refused (``add_frame`` returns False),
a retry or a replay after restart never duplicates. An item SQLite can never take (a constraint
it violates, e.g. a NaN time in a NOT NULL column; a value that cannot be bound: an integer
beyond 64 bits, a string that is not UTF-8, an unsupported type) raises ``StoreError`` with
reason ``rejected`` and ``permanent`` True: retrying it cannot succeed, the caller gives it up.
Before each write the file at the path is checked to be the one open (SQLite would go on writing
into a deleted file): one removed, with its directory or alone, is made again from the open
connection with every row (logged ``store_recreated``; reason ``file_missing`` where it cannot
be); one replaced by another file raises reason ``file_replaced`` and is not written.

Threads: one writer connection per ``ResultStore``, to be used from one writer thread (a lock
guards it all the same). Every read opens its own short read-only connection, so reads may come
from any thread or process (``nanoseg results``) while the daemon writes.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np

from nanoseg.codec import json_safe, json_text
from nanoseg.masks import RLE, encode_rle_batch
from nanoseg.particle_stats import COLUMNS_FLAG, COLUMNS_NM, COLUMNS_PX
from nanoseg_daemon.contracts import FrameResult, RunStarted, RunStopped
from nanoseg_daemon.logs import log

SCHEMA_VERSION = 2  # 2: wire geometry columns and edge/overlap flags (nanoseg 0.2)
DB_FILENAME = "results.sqlite3"
PARTICLE_COLUMNS = (*COLUMNS_PX, *COLUMNS_FLAG, "mean_od", *COLUMNS_NM)
"""ParticleTable columns stored as real columns (NULL where absent or NaN; flags 0/1)."""
INTEGER_COLUMNS = ("area_px", *COLUMNS_FLAG)
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")  # px, pixel-edge coordinates, y down

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE runs (
        run_uid TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        stopped_at REAL,
        exit_status TEXT,
        metadata TEXT NOT NULL,
        model_version TEXT)""",
    """CREATE TABLE frames (
        frame_uid TEXT PRIMARY KEY,
        run_uid TEXT NOT NULL REFERENCES runs(run_uid),
        seq_num INTEGER NOT NULL,
        timestamp REAL NOT NULL,
        stored_at REAL NOT NULL,
        model_version TEXT NOT NULL,
        count INTEGER NOT NULL,
        summary TEXT NOT NULL,
        invalid_pixels TEXT NOT NULL,
        timings TEXT NOT NULL,
        metadata TEXT NOT NULL)""",
    "CREATE INDEX frames_by_run ON frames(run_uid, seq_num)",
    f"""CREATE TABLE particles (
        frame_uid TEXT NOT NULL REFERENCES frames(frame_uid),
        idx INTEGER NOT NULL,
        score REAL NOT NULL,
        {", ".join(f"{c} REAL" for c in BOX_COLUMNS)},
        {", ".join(f"{c} {'INTEGER' if c in INTEGER_COLUMNS else 'REAL'}" for c in PARTICLE_COLUMNS)},
        mask_rle TEXT NOT NULL,
        PRIMARY KEY (frame_uid, idx)) WITHOUT ROWID""",
)

# Runs open at ingest, so a restarted daemon can resume them (added to schema 2 stores on open:
# the table is new, nothing existing changes). Bluesky ingest writes a run's row as the run opens
# (``run_opened``), ``add_run`` any other started run's (raw input), so a restarted daemon finds
# every run it left open; a run's row goes when its stop is stored.
_OPEN_RUNS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS open_runs (
        run_uid TEXT PRIMARY KEY,
        start_doc TEXT NOT NULL,
        descriptors TEXT NOT NULL DEFAULT '[]',
        analysis_start TEXT,
        analysis_descriptor_uid TEXT)""",
)

_REASONS = {
    "SQLITE_FULL": "disk_full",
    "SQLITE_READONLY": "read_only",
    "SQLITE_IOERR": "io_error",
    "SQLITE_BUSY": "locked",
    "SQLITE_LOCKED": "locked",
    "SQLITE_CANTOPEN": "cant_open",
    "SQLITE_CORRUPT": "corrupt",
    "SQLITE_NOTADB": "corrupt",
    "SQLITE_PERM": "read_only",
}


class StoreError(Exception):
    """A write (or open) failed; nothing of the operation was stored. ``reason`` is a metric label.

    ``permanent``: the item itself is at fault (reason ``rejected``), so a retry cannot succeed;
    otherwise the failure is the store's (disk full, locked, I/O) and a retry may."""

    def __init__(self, reason: str, detail: str, permanent: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.permanent = permanent


def _store_error(err: sqlite3.Error, what: str) -> StoreError:
    name = getattr(err, "sqlite_errorname", "") or ""
    if _refused_item(err):
        return StoreError("rejected", f"{what}: {err} ({name or type(err).__name__})", permanent=True)
    reason = next((r for k, r in _REASONS.items() if name.startswith(k)), "sqlite_error")
    return StoreError(reason, f"{what}: {err} ({name or type(err).__name__})")


def _refused_item(err: BaseException) -> bool:
    """Whether ``err``, raised inside a write, is the item's fault: retrying it cannot succeed.

    A constraint the values violate (``IntegrityError``: NOT NULL with a NaN, ...), a value too
    big (``DataError``), a value the driver cannot bind (``ProgrammingError: Error binding
    parameter``; ``OverflowError``: an integer beyond 64 bits; ``ValueError``: a string with lone
    surrogates; ``TypeError``) or encode. Not: locked, disk full, I/O errors (``OperationalError``
    and the like), which a later retry may get past."""
    if isinstance(err, sqlite3.IntegrityError | sqlite3.DataError):
        return True
    if isinstance(err, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return "binding" in str(err)
    return isinstance(err, ValueError | TypeError | OverflowError)


def _run_metadata(ev: RunStarted) -> dict[str, Any]:
    m = ev.metadata
    return {
        "pixel_size_nm": m.pixel_size_nm,
        "i0": m.i0,
        "profile": m.profile,
        "flat_field_shape": None if m.flat_field is None else list(m.flat_field.shape),
        "dark_frame_shape": None if m.dark_frame is None else list(m.dark_frame.shape),
        "extra": m.extra,
        "start_doc": _without_images(ev.start_doc),
    }


def _without_images(obj: Any, max_elements: int = 64) -> Any:
    """The start document with large arrays (dark frames, flat fields) replaced by their shape.

    Images belong to the raw data, not to the results database (a 512 x 512 dark frame is ~1 MB
    of JSON per run).
    """
    if isinstance(obj, np.ndarray) and obj.size > max_elements:
        return {"array_shape": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, list) and len(obj) > max_elements:
        arr = np.asarray(obj, dtype=object)
        return {"array_shape": list(arr.shape) if arr.ndim else [len(obj)], "dtype": "list"}
    if isinstance(obj, dict):
        return {k: _without_images(v, max_elements) for k, v in obj.items()}
    return obj


def particle_rows(result: FrameResult, rles: Sequence[RLE] | None = None) -> list[tuple[Any, ...]]:
    """The particles table's rows of one frame (column order of the table)."""
    inst, table = result.instances, result.table
    if len(table) != len(inst):
        raise ValueError(f"table has {len(table)} particles, instances {len(inst)}")
    if not len(inst):
        return []
    if rles is None:
        rles = encode_rle_batch(inst.box_masks)
    present = table.columns()
    cols = [present.get(c) for c in PARTICLE_COLUMNS]
    rows = []
    for i in range(len(inst)):
        values = [None if c is None else json_safe(c[i].item()) for c in cols]
        box = [float(v) for v in inst.boxes[i]]
        rows.append((result.frame_uid, i, float(inst.scores[i]), *box, *values, json_text(rles[i])))
    return rows


@dataclass(frozen=True)
class RunRecord:
    run_uid: str
    started_at: float
    stopped_at: float | None
    exit_status: str | None
    metadata: dict[str, Any]
    model_version: str | None
    frame_count: int
    particle_count: int


@dataclass(frozen=True)
class OpenRun:
    """A raw run open when the daemon last ran: its documents, to resume it after a restart."""

    run_uid: str
    start_doc: dict[str, Any]
    descriptors: list[dict[str, Any]]
    analysis_start: dict[str, Any] | None  # the analysis run's start document, once published
    analysis_descriptor_uid: str | None
    frames: int  # frames of the run stored
    last_seq_num: int  # highest stored frame seq_num (0: none)


@dataclass(frozen=True)
class FrameRecord:
    frame_uid: str
    run_uid: str
    seq_num: int
    timestamp: float
    stored_at: float
    model_version: str
    count: int
    summary: dict[str, Any]
    invalid_pixels: dict[str, int]
    timings: dict[str, float]
    metadata: dict[str, Any]


class ResultReader:
    """Read access to an existing store; every call opens its own read-only connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no result store at {self.path}")
        with self._read() as conn:
            _check_version(conn, self.path)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=5.0)
        except sqlite3.Error as err:
            raise _store_error(err, f"open {self.path}") from err
        with closing(conn):
            yield conn

    def has_frame(self, frame_uid: str) -> bool:
        with self._read() as conn:
            q = conn.execute("SELECT 1 FROM frames WHERE frame_uid = ?", (frame_uid,))
            return q.fetchone() is not None

    def frame_count(self, run_uid: str) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM frames WHERE run_uid = ?", (run_uid,)).fetchone()[0])

    def runs(self) -> list[RunRecord]:
        """All runs, oldest first, with their numbers of frames and particles."""
        sql = """SELECT r.run_uid, r.started_at, r.stopped_at, r.exit_status, r.metadata,
                        r.model_version, COUNT(f.frame_uid), COALESCE(SUM(f.count), 0)
                 FROM runs r LEFT JOIN frames f ON f.run_uid = r.run_uid
                 GROUP BY r.run_uid ORDER BY r.started_at, r.run_uid"""
        with self._read() as conn:
            return [
                RunRecord(u, s, e, x, json.loads(m), v, int(nf), int(npart))
                for u, s, e, x, m, v, nf, npart in conn.execute(sql)
            ]

    def open_runs(self) -> list[OpenRun]:
        """The runs recorded open (started, not stopped), with their stored frame counts."""
        with self._read() as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'open_runs'").fetchone():
                return []
            sql = """SELECT o.run_uid, o.start_doc, o.descriptors, o.analysis_start, o.analysis_descriptor_uid,
                            COUNT(f.frame_uid), COALESCE(MAX(f.seq_num), 0)
                     FROM open_runs o LEFT JOIN frames f ON f.run_uid = o.run_uid
                     GROUP BY o.run_uid ORDER BY o.rowid"""
            return [
                OpenRun(u, json.loads(s), json.loads(d), None if a is None else json.loads(a), du, int(n), int(q))
                for u, s, d, a, du, n, q in conn.execute(sql)
            ]

    def unlisted_open_runs(self) -> list[str]:
        """Runs never stopped that ``open_runs`` does not list (oldest first): rows that frames or
        a stop made for a run whose start was not stored (``add_frame``'s placeholder run)."""
        with self._read() as conn:
            has_open = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'open_runs'").fetchone()
            sql = "SELECT run_uid FROM runs r WHERE stopped_at IS NULL" + (
                " AND NOT EXISTS (SELECT 1 FROM open_runs o WHERE o.run_uid = r.run_uid)" if has_open else "")
            return [u for (u,) in conn.execute(sql + " ORDER BY started_at, run_uid")]

    def frames(self, run_uid: str) -> list[FrameRecord]:
        """The run's frames in frame order (seq_num)."""
        sql = """SELECT frame_uid, run_uid, seq_num, timestamp, stored_at, model_version, count,
                        summary, invalid_pixels, timings, metadata
                 FROM frames WHERE run_uid = ? ORDER BY seq_num, frame_uid"""
        with self._read() as conn:
            return [
                FrameRecord(*row[:7], *(json.loads(v) for v in row[7:]))
                for row in conn.execute(sql, (run_uid,))
            ]

    def particles(self, run_uid: str) -> list[dict[str, Any]]:
        """One dict per particle of the run, in frame then index order; ``mask_rle`` is an RLE."""
        sql = """SELECT f.seq_num, p.* FROM particles p JOIN frames f ON f.frame_uid = p.frame_uid
                 WHERE f.run_uid = ? ORDER BY f.seq_num, f.frame_uid, p.idx"""
        with self._read() as conn:
            cur = conn.execute(sql, (run_uid,))
            names = [d[0] for d in cur.description]
            out = []
            for row in cur:
                rec = dict(zip(names, row))
                rec["mask_rle"] = json.loads(rec["mask_rle"])
                out.append(rec)
            return out


def _check_version(conn: sqlite3.Connection, path: Path) -> int | None:
    """The store's schema version (None for an empty file); a different version is refused."""
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not exists:
            return None
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.Error as err:
        raise _store_error(err, f"read schema of {path}") from err
    version = None if row is None else int(row[0])
    if version != SCHEMA_VERSION:
        raise StoreError("schema_version", f"{path} has schema version {version}, expected {SCHEMA_VERSION}")
    return version


class ResultStore(ResultReader):
    """The daemon's writer: creates the file (and its directory) if needed, WAL mode.

    ``max_bytes`` caps the database size (SQLite ``max_page_count``): writes beyond it fail with
    ``StoreError("disk_full")`` like a full disk, which keeps the state directory from filling up.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._synchronous, self._max_bytes = synchronous, max_bytes
        self._conn, self._file_id = self._connect()
        try:
            with self._write("create schema") as conn:
                if _check_version(conn, self.path) is None:
                    for stmt in _SCHEMA:
                        conn.execute(stmt)
                    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                for stmt in _OPEN_RUNS_SCHEMA:
                    conn.execute(stmt)
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """The writer connection to ``self.path`` (created with its directory where missing), WAL,
        and the file's identity (st_dev, st_ino), to notice the file being removed or replaced."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except OSError as err:
            raise StoreError("cant_open", f"open {self.path}: {err}") from err
        except sqlite3.Error as err:
            raise _store_error(err, f"open {self.path}") from err
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError("no_wal", f"{self.path}: journal_mode is {mode}, WAL is required")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            if self._max_bytes is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, self._max_bytes // page)}")
            st = self.path.stat()
        except sqlite3.Error as err:
            conn.close()
            raise _store_error(err, f"open {self.path}") from err
        except OSError as err:
            conn.close()
            raise StoreError("cant_open", f"open {self.path}: {err}") from err
        except BaseException:
            conn.close()
            raise
        return conn, (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """Before a write: the file written is still the one at ``self.path`` (one stat, ~µs).

        SQLite in WAL mode goes on writing into a file that was deleted (its directory removed) or
        replaced, so every later result would be lost without an error. A file gone from its
        path is made again there from the open connection (SQLite's backup: every row stored so
        far, then the writer moves to it; logged ``store_recreated``). A file replaced by another
        raises ``StoreError("file_replaced")`` (the store will not write over what someone put
        there, nor into the old file): results wait in the chain, and are lost beyond its
        ``max_pending``, until the file is moved back or the daemon restarted."""
        try:
            st = self.path.stat()
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as err:
            raise StoreError("io_error", f"stat {self.path}: {err}") from err
        if st is not None and (st.st_dev, st.st_ino) == self._file_id:
            return
        if st is not None:
            raise StoreError("file_replaced", f"{self.path} is another file than the one the daemon opened; "
                             "results are held (not written) until it is moved back or the daemon restarted")
        old = self._conn
        t0 = time.monotonic()
        # copied beside the path, then renamed onto it: a copy that fails half way (disk full) leaves
        # nothing at the path (which the next write would take for a replaced file), and readers
        # never open a half-written store
        tmp = self.path.with_name(f".{self.path.name}.recreate.tmp")
        placed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(tmp)) as copy:
                old.backup(copy)
            os.replace(tmp, self.path)
            placed = True
            self._conn, self._file_id = self._connect()
        except (OSError, sqlite3.Error, StoreError) as err:
            leftovers = [tmp, tmp.with_name(tmp.name + "-journal")]
            if placed:  # not opened: the next write makes it again, rather than take it for another's file
                leftovers += [self.path, *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm"))]
            for leftover in leftovers:
                with suppress(OSError):
                    leftover.unlink()
            raise StoreError("file_missing", f"{self.path} was removed and cannot be made again: {err}") from err
        with suppress(sqlite3.Error):
            old.close()
        log("store_recreated", logging.ERROR, path=str(self.path), seconds=round(time.monotonic() - t0, 3),
            detail="the result store's file was removed while the daemon wrote it; made again from the "
                   "open connection, with every result stored so far (the copy holds up the output for "
                   "as long as it takes: about 2 s per GB)")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; rolled back on any error, sqlite errors become StoreError."""
        with self._lock:
            self._check_file()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as err:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):  # SQLite may have rolled back already
                        conn.execute("ROLLBACK")
                if isinstance(err, sqlite3.Error):
                    raise _store_error(err, what) from err
                if isinstance(err, Exception) and _refused_item(err):  # binding or encoding the item's values
                    raise StoreError("rejected", f"{what}: {type(err).__name__}: {err}", permanent=True) from err
                raise

    def add_run(self, ev: RunStarted, model_version: str) -> None:
        """Record a run start. Idempotent: a repeated start (replay, restart) keeps the earliest
        ``started_at`` and replaces metadata and model version; it also fills in a run that
        frames created before its start was seen. The run is recorded open (``open_runs``, its
        start document) unless ingest recorded it already (``run_opened``), until its stop."""
        with self._write(f"add_run {ev.run_uid}") as conn:
            conn.execute(
                """INSERT INTO runs (run_uid, started_at, metadata, model_version) VALUES (?, ?, ?, ?)
                   ON CONFLICT(run_uid) DO UPDATE SET started_at = MIN(started_at, excluded.started_at),
                   metadata = excluded.metadata, model_version = excluded.model_version""",
                (ev.run_uid, ev.time, json_text(_run_metadata(ev)), model_version),
            )
            conn.execute("INSERT INTO open_runs (run_uid, start_doc) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         (ev.run_uid, json_text({"uid": ev.run_uid, **ev.start_doc})))

    def add_frame(self, result: FrameResult, rles: Sequence[RLE] | None = None) -> bool:
        """Store one frame and its particles in one transaction.

        Returns False, changing nothing, if ``frame_uid`` is already stored. ``rles``: the masks'
        COCO RLE when the caller already has them (else encoded here). A frame of a run never
        announced creates a placeholder run (started_at = frame timestamp, no metadata).
        Raises StoreError (nothing stored; retry later with the same result).
        """
        return self.add_frames([result], [rles])[0]

    def add_frames(self, results: Sequence[FrameResult],
                   rles: Sequence[Sequence[RLE] | None] | None = None) -> list[bool]:
        """Store several frames (each as ``add_frame``) in one transaction: one commit for all.

        Returns, per frame, False where its ``frame_uid`` was already stored (nothing of it
        written). Raises StoreError with nothing of any of them stored.
        """
        if not results:
            return []
        now = time.time()
        todo = [(r, particle_rows(r, None if rles is None else rles[i]),
                 (r.frame_uid, r.run_uid, r.seq_num, r.timestamp, now, r.model_version, len(r.table), r.summary_json,
                  json_text(r.invalid_pixels), json_text(r.timings), json_text(r.metadata)))
                for i, r in enumerate(results)]  # fmt: skip
        added: list[bool] = []
        what = f"add_frame {results[0].frame_uid}" + (f" (+{len(results) - 1})" if len(results) > 1 else "")
        with self._write(what) as conn:
            runs_seen: set[str] = set()  # a group is mostly one run's frames: its row made once
            for result, rows, frame in todo:
                if result.run_uid not in runs_seen:
                    runs_seen.add(result.run_uid)
                    conn.execute(
                        "INSERT INTO runs (run_uid, started_at, metadata) VALUES (?, ?, '{}') ON CONFLICT DO NOTHING",
                        (result.run_uid, result.timestamp),
                    )
                cur = conn.execute(
                    f"INSERT INTO frames VALUES ({', '.join('?' * len(frame))}) ON CONFLICT DO NOTHING", frame
                )
                added.append(cur.rowcount != 0)
                if cur.rowcount and rows:
                    conn.executemany(f"INSERT INTO particles VALUES ({', '.join('?' * len(rows[0]))})", rows)
        return added

    def stop_run(self, ev: RunStopped) -> None:
        """Record a run's end (a run never announced gets a placeholder row); it is no longer open.
        A stop ``reason`` goes into the run's metadata as ``stop_reason``."""
        with self._write(f"stop_run {ev.run_uid}") as conn:
            conn.execute(
                """INSERT INTO runs (run_uid, started_at, stopped_at, exit_status, metadata)
                   VALUES (?, ?, ?, ?, '{}') ON CONFLICT(run_uid) DO UPDATE SET
                   stopped_at = excluded.stopped_at, exit_status = excluded.exit_status""",
                (ev.run_uid, ev.time, ev.time, ev.exit_status),
            )
            if ev.reason:
                conn.execute("UPDATE runs SET metadata = json_set(metadata, '$.stop_reason', ?) WHERE run_uid = ?",
                             (ev.reason, ev.run_uid))
            conn.execute("DELETE FROM open_runs WHERE run_uid = ?", (ev.run_uid,))

    # -- open runs (``open_runs``): written at ingest, read by a restarted daemon ----------------

    def run_opened(self, start_doc: dict[str, Any]) -> None:
        """Record a raw run as open (its whole start document, dark frames included, to resume it)."""
        uid = str(start_doc["uid"])
        with self._write(f"run_opened {uid}") as conn:
            conn.execute("INSERT INTO open_runs (run_uid, start_doc) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         (uid, json_text(start_doc)))

    def descriptor_added(self, run_uid: str, descriptor: dict[str, Any]) -> None:
        """Add a descriptor to an open run (a run not recorded open is left alone)."""
        with self._write(f"descriptor_added {run_uid}") as conn:
            conn.execute(
                """UPDATE open_runs SET descriptors = json_insert(descriptors, '$[#]', json(?))
                   WHERE run_uid = ? AND NOT EXISTS (SELECT 1 FROM json_each(descriptors) d
                                                    WHERE json_extract(d.value, '$.uid') = ?)""",
                (json_text(descriptor), run_uid, descriptor["uid"]))

    def analysis_opened(self, run_uid: str, analysis_start: dict[str, Any], descriptor_uid: str) -> None:
        """Record the analysis run published for an open raw run (to continue it after a restart)."""
        with self._write(f"analysis_opened {run_uid}") as conn:
            conn.execute("UPDATE open_runs SET analysis_start = ?, analysis_descriptor_uid = ? WHERE run_uid = ?",
                         (json_text(analysis_start), descriptor_uid, run_uid))

    def close(self) -> None:
        """Close the writer connection (SQLite checkpoints the WAL into the main file)."""
        with self._lock:
            self._conn.close()


def default_path(state_dir: str | Path) -> Path:
    """Where the daemon keeps its store under ``state_dir``."""
    return Path(state_dir) / DB_FILENAME
