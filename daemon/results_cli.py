"""``nanoseg results``: list the runs of a result store; export a run's particles and frames.

Exports are flat tables, one row per particle (``particles``) and per frame (``frames``), as CSV
or Parquet (needs the package pyarrow). Units as stored: ``*_px`` in pixels, ``*_nm`` in nm,
angles in degrees [0, 180) counter-clockwise from the image x axis (y down), times in s since
the epoch. A particle's mask is its COCO RLE: ``mask_height``, ``mask_width``, ``mask_counts``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoseg.cli import lazy

if TYPE_CHECKING:
    from nanoseg_daemon.store import FrameRecord, ResultReader


class ResultsError(Exception):
    """A request the store cannot answer (unknown run, missing package)."""


def add_parser(sub: Any) -> None:
    """Add ``results list|export`` to the ``nanoseg`` subparsers."""
    p = sub.add_parser("results", help="list stored runs; export a run's particles and frames (CSV, Parquet)")
    p.set_defaults(handler=lazy("nanoseg_daemon.results_cli:cmd_results"))
    rs = p.add_subparsers(dest="results_command", required=True)

    def store_args(q: argparse.ArgumentParser) -> None:
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--state-dir", help="the daemon's state directory (uses its results.sqlite3)")
        g.add_argument("--db", help="path of a result store file")

    q = rs.add_parser("list", help="runs with their numbers of frames and particles")
    store_args(q)
    q.add_argument("--json", action="store_true", help="one JSON object per run and line")
    q = rs.add_parser("export", help="write particles and frames of one run")
    q.add_argument("run_uid", help="the run's uid, or a prefix that names one run")
    store_args(q)
    q.add_argument("--format", choices=["csv", "parquet"], default="csv")
    q.add_argument("--out", required=True, help="output directory (created if needed)")


def cmd_results(args: argparse.Namespace) -> int:
    from nanoseg_daemon.store import ResultReader, StoreError, default_path

    path = Path(args.db) if args.db else default_path(args.state_dir)
    try:
        reader = ResultReader(path)
        if args.results_command == "list":
            _list(reader, args.json)
        else:
            for line in export_run(reader, args.run_uid, args.format, Path(args.out)):
                print(line)
    except (ResultsError, StoreError) as err:
        print(f"nanoseg results: error: {err}", file=sys.stderr)
        return 2
    return 0


def _time(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _list(reader: ResultReader, as_json: bool) -> None:
    runs = reader.runs()
    if as_json:
        for r in runs:
            print(json.dumps({
                "run_uid": r.run_uid, "started_at": r.started_at, "stopped_at": r.stopped_at,
                "exit_status": r.exit_status, "frames": r.frame_count, "particles": r.particle_count,
                "model_version": r.model_version,
            }))  # fmt: skip
        return
    rows = [("RUN_UID", "STARTED (UTC)", "STOPPED (UTC)", "STATUS", "FRAMES", "PARTICLES", "MODEL")]
    rows += [
        (r.run_uid, _time(r.started_at), _time(r.stopped_at), r.exit_status or "running",
         str(r.frame_count), str(r.particle_count), r.model_version or "-")
        for r in runs
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _resolve_run(reader: ResultReader, run_uid: str) -> str:
    uids = [r.run_uid for r in reader.runs()]
    if run_uid in uids:
        return run_uid
    matches = [u for u in uids if u.startswith(run_uid)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise ResultsError(f"{what} in {reader.path} match {run_uid!r}")
    return matches[0]


def frame_rows(frames: Iterable[FrameRecord]) -> list[dict[str, Any]]:
    """One flat dict per frame: summary statistics as ``<column>_<mean|median|std>``."""
    rows = []
    for f in frames:
        s = f.summary
        row: dict[str, Any] = {
            "run_uid": f.run_uid, "frame_uid": f.frame_uid, "seq_num": f.seq_num,
            "timestamp": f.timestamp, "stored_at": f.stored_at, "model_version": f.model_version,
            "count": f.count, "coverage_fraction": s.get("coverage_fraction"),
            "orientation_order": s.get("orientation_order"), "pixel_size_nm": s.get("pixel_size_nm"),
            "frame_height": s["frame_shape"][0], "frame_width": s["frame_shape"][1],
        }  # fmt: skip
        for col, stat in s.get("stats", {}).items():
            row.update({f"{col}_{k}": v for k, v in stat.items()})
        row.update({f"invalid_{k}": v for k, v in f.invalid_pixels.items()})
        row.update({f"time_{k}_s": v for k, v in f.timings.items()})
        row["metadata"] = json.dumps(f.metadata, sort_keys=True)
        rows.append(row)
    return rows


def particle_rows(particles: Iterable[dict[str, Any]], run_uid: str) -> list[dict[str, Any]]:
    """One flat dict per particle; the mask RLE split into height, width and counts."""
    rows = []
    for p in particles:
        row = {"run_uid": run_uid, **{k: v for k, v in p.items() if k != "mask_rle"}}
        rle = p["mask_rle"]
        row.update(mask_height=rle["size"][0], mask_width=rle["size"][1], mask_counts=rle["counts"])
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]], first: Iterable[str]) -> list[str]:
    cols = dict.fromkeys(first)
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def export_run(reader: ResultReader, run_uid: str, fmt: str, out: Path) -> list[str]:
    """Write ``particles.<fmt>`` and ``frames.<fmt>`` of one run into ``out``; report lines."""
    from nanoseg_daemon.store import BOX_COLUMNS, PARTICLE_COLUMNS

    run_uid = _resolve_run(reader, run_uid)
    particle_cols = ["run_uid", "frame_uid", "seq_num", "idx", "score", *BOX_COLUMNS, *PARTICLE_COLUMNS,
                     "mask_height", "mask_width", "mask_counts"]  # fmt: skip
    tables = {
        "particles": (particle_rows(reader.particles(run_uid), run_uid), particle_cols),
        "frames": (frame_rows(reader.frames(run_uid)), ["run_uid", "frame_uid", "seq_num"]),
    }
    write = _write_parquet if fmt == "parquet" else _write_csv
    if fmt == "parquet":
        _pyarrow()  # fail before writing anything
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, (rows, first) in tables.items():
        path = out / f"{name}.{fmt}"
        write(path, rows, _columns(rows, first))
        lines.append(f"wrote {len(rows)} {name} of run {run_uid} to {path}")
    return lines


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)  # None (missing, NaN) -> empty field


_STRING_COLUMNS = {"run_uid", "frame_uid", "model_version", "metadata", "mask_counts"}
_INT_COLUMNS = {"seq_num", "idx", "count", "area_px", "mask_height", "mask_width", "frame_height", "frame_width"}


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ResultsError(
            "--format parquet needs the package 'pyarrow' (pip install pyarrow), or use --format csv"
        ) from None
    return pyarrow


def _write_parquet(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    pa = _pyarrow()

    def arrow_type(col: str) -> Any:
        if col in _STRING_COLUMNS:
            return pa.string()
        if col in _INT_COLUMNS or col.startswith("invalid_"):
            return pa.int64()
        return pa.float64()

    table = pa.table({c: pa.array([r.get(c) for r in rows], type=arrow_type(c)) for c in columns})
    pa.parquet.write_table(table, path)
