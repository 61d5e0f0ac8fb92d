"""``nanoseg results``: list the runs of a result store; export a run's particles, frames and summary.

Exports are flat tables, one row per particle (``particles``), per frame (``frames``) and per
summarised column of the whole run (``run``: every particle of the run pooled, under the counting
rule for edge particles, with 95 % bootstrap intervals), as CSV or Parquet (needs the package
pyarrow). Units in the column names: ``*_px`` in pixels, ``*_nm`` in nm, ``*_nm2`` in nm^2,
``*_deg`` in degrees [0, 180) counter-clockwise from the image x axis (y down), times in s since
the epoch. A particle's mask is its COCO RLE: ``mask_height``, ``mask_width``, ``mask_counts``.

CSV values are rounded to what a measurement can carry (``round_value``: 0.01 px, 0.1 nm,
1 nm^2, 0.01 deg, 4 decimals for ratios); Parquet keeps the stored float64 values.
``--names imagej`` puts ImageJ/Fiji "Analyze Particles" columns first (Area, Perim., Major,
Minor, Angle, Circ., Feret, FeretAngle, MinFeret, Solidity, AR, Round, X, Y, Width, Height, Mean)
in nm where the run has a pixel size, else px (column ``Unit``), followed by every native column.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from nanoseg.cli import lazy
from nanoseg.particle_stats import COLUMNS_FLAG, INTERVAL_COLUMNS, round_value
from nanoseg.summary_stats import EDGE_RULES, EdgeRule, edge_weights, stat_with_interval

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
    q.add_argument("--names", choices=["native", "imagej"], default="native",
                   help="particle column names: ours (units in the names) or ImageJ's first")
    q.add_argument("--edge-rule", choices=list(EDGE_RULES), default=None,
                   help="counting rule of the run summary (default: the one the frames were summarised with)")
    q.add_argument("--out", required=True, help="output directory (created if needed)")
    q = rs.add_parser("report", help="one run's distributions and growth with 95 %% intervals (PNG and HTML)")
    q.add_argument("run_uid", help="the run's uid, or a prefix that names one run")
    store_args(q)
    q.add_argument("--edge-rule", choices=list(EDGE_RULES), default=None,
                   help="counting rule (default: the one the frames were summarised with)")
    q.add_argument("--out", required=True, help="output directory (created if needed)")


def cmd_results(args: argparse.Namespace) -> int:
    """``nanoseg results list|export|report``: exit 0, or 2 with one line naming the store, the run
    or the output that is at fault (not a result store, locked, another schema version, unknown
    run, an ``--out`` that cannot be written)."""
    from nanoseg_daemon.store import ResultReader, StoreError, default_path

    path = Path(args.db) if args.db else default_path(args.state_dir)
    with contextlib.suppress(AttributeError, ValueError):  # a run uid the terminal cannot show: escaped
        cast(Any, sys.stdout).reconfigure(errors="backslashreplace")
    try:
        if getattr(args, "out", None) is not None:
            _check_out(Path(args.out))
        reader = ResultReader(path)
        if args.results_command == "list":
            _list(reader, args.json)
        elif args.results_command == "report":
            from nanoseg_daemon.results_report import write_report

            uid = _resolve_run(reader, args.run_uid)
            rule = _edge_rule(reader.frames(uid), args.edge_rule)
            rows = run_rows(reader.particles(uid), reader.frames(uid), rule)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            png, page = out / "report.png", out / "report.html"
            with staged([png, page]) as (png_tmp, page_tmp):  # both whole, or the earlier pair kept
                write_report(reader, uid, rule, png_tmp, page_tmp, rows)
            print(f"wrote {png}\nwrote {page}")
        else:
            for line in export_run(reader, args.run_uid, args.format, Path(args.out), args.names, args.edge_rule):
                print(line)
    except (ResultsError, StoreError) as err:
        return _error(str(err))
    except sqlite3.Error as err:  # a SQLite file but not a result store (empty, another program's)
        what = "not a nanoseg result store" if "no such table" in str(err) else "cannot read it"
        return _error(f"{path}: {what} ({err})")
    except json.JSONDecodeError as err:
        return _error(f"{path}: a stored JSON value is corrupt ({err})")
    except OSError as err:
        if err.filename is None:  # ResultReader: "no result store at ..."
            return _error(str(err))
        return _error(f"cannot write {err.filename}: {err.strerror or err}")
    return 0


def _error(message: str) -> int:
    print(f"nanoseg results: error: {message}", file=sys.stderr)
    return 2


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a directory, before the store is read."""
    if out.exists() and not out.is_dir():
        raise ResultsError(f"--out {out}: exists and is not a directory")


def _time(t: float | None) -> str:
    """``t`` (s since the epoch) as UTC date and time; as stored where no date can show it (a
    store written by an older daemon may hold milliseconds, NaN...), so one run never hides all."""
    if t is None:
        return "-"
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError, TypeError):
        return repr(t)


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
            "edge_rule": s.get("edge_rule"), "counted": s.get("counted"),
            "touching_edge": s.get("touching_edge"), "overlapped": s.get("overlapped"),
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


def run_rows(
    particles: list[dict[str, Any]], frames: list[FrameRecord], edge_rule: EdgeRule, seed: int = 0
) -> list[dict[str, Any]]:
    """The run's summary: one row per ``INTERVAL_COLUMNS`` column (and its nm version), every
    particle of the run pooled, weighted by ``edge_rule`` within its frame, 95 % bootstrap
    intervals (seeded) and the count for +-5 % on the median."""
    shapes = {f.frame_uid: tuple(f.summary["frame_shape"]) for f in frames}
    weights = np.zeros(len(particles))
    for uid in shapes:
        idx = [i for i, p in enumerate(particles) if p["frame_uid"] == uid]
        if idx:
            col = {k: np.array([np.nan if particles[i][k] is None else particles[i][k] for i in idx], dtype=np.float64)
                   for k in ("touches_edge", "bbox_width_px", "bbox_height_px")}  # fmt: skip
            weights[idx] = edge_weights(edge_rule, col["touches_edge"] > 0, col["bbox_width_px"],
                                        col["bbox_height_px"], shapes[uid])
    rows = []
    names = [*INTERVAL_COLUMNS, *(c.replace("_px", "_nm").replace("area_nm", "area_nm2") for c in INTERVAL_COLUMNS if c.endswith("_px"))]
    for name in names:
        values = np.array([np.nan if p.get(name) is None else p[name] for p in particles], dtype=np.float64)
        if not np.isfinite(values).any():
            continue
        st = stat_with_interval(values, weights, 1000, np.random.default_rng(seed), 0.05)
        rows.append({"run_uid": frames[0].run_uid if frames else None, "column": name, "edge_rule": edge_rule,
                     "particles": len(particles), "counted": int(((weights > 0) & np.isfinite(values)).sum()),
                     **st.to_dict()})  # fmt: skip
    return rows


IMAGEJ_COLUMNS = (
    ("Area", "area_nm2", "area_px"), ("Perim.", "perimeter_nm", "perimeter_px"), ("Major", "major_nm", "major_px"),
    ("Minor", "minor_nm", "minor_px"), ("Angle", "orientation_deg", "orientation_deg"),
    ("Circ.", "circularity", "circularity"), ("Feret", "feret_nm", "feret_px"),
    ("FeretAngle", "feret_angle_deg", "feret_angle_deg"), ("MinFeret", "min_feret_nm", "min_feret_px"),
    ("Solidity", "solidity", "solidity"),
)  # fmt: skip
"""ImageJ "Analyze Particles" name, our calibrated column, our px column (same definitions)."""
IMAGEJ_DERIVED = ("AR", "Round", "X", "Y", "Width", "Height", "Mean")
"""ImageJ's columns computed from ours: major / minor, minor / major, centroid, box, mean OD."""


def imagej_rows(rows: list[dict[str, Any]], pixel_size_nm: float | None) -> list[dict[str, Any]]:
    """ImageJ's columns first (nm where ``pixel_size_nm`` is known, else px), then ours."""
    out = []
    for r in rows:
        calibrated = pixel_size_nm is not None and r.get("area_nm2") is not None
        ij: dict[str, Any] = {name: r.get(nm if calibrated else px) for name, nm, px in IMAGEJ_COLUMNS}
        major, minor = ij["Major"], ij["Minor"]
        ij["AR"] = major / minor if major and minor else None
        ij["Round"] = minor / major if major and minor else None
        scale = pixel_size_nm if calibrated and pixel_size_nm else 1.0
        for name, col in (("X", "centroid_x"), ("Y", "centroid_y"), ("Width", "bbox_width_px"),
                          ("Height", "bbox_height_px")):
            ij[name] = None if r.get(col) is None else r[col] * scale
        ij["Mean"] = r.get("mean_od")
        ij["Unit"] = "nm" if calibrated else "px"
        out.append({**ij, **r})
    return out


def _edge_rule(frames: list[FrameRecord], asked: str | None) -> EdgeRule:
    """The rule asked for, else the one the run's frames were summarised with (else include)."""
    rule = asked or next((f.summary.get("edge_rule") for f in frames if f.summary.get("edge_rule")), "include")
    if rule not in EDGE_RULES:
        raise ResultsError(f"edge rule must be one of {', '.join(EDGE_RULES)}, got {rule!r}")
    return cast(EdgeRule, rule)


def export_run(
    reader: ResultReader, run_uid: str, fmt: str, out: Path, names: str = "native", edge_rule: str | None = None
) -> list[str]:
    """Write ``particles``, ``frames`` and ``run`` tables (``.<fmt>``) of one run into ``out``;
    returns report lines."""
    from nanoseg_daemon.store import BOX_COLUMNS, PARTICLE_COLUMNS

    run_uid = _resolve_run(reader, run_uid)
    particle_cols = ["run_uid", "frame_uid", "seq_num", "idx", "score", *BOX_COLUMNS, *PARTICLE_COLUMNS,
                     "mask_height", "mask_width", "mask_counts"]  # fmt: skip
    stored = reader.particles(run_uid)
    frames = reader.frames(run_uid)
    rule = _edge_rule(frames, edge_rule)
    particles = particle_rows(stored, run_uid)
    if names == "imagej":
        pixel = next((f.summary.get("pixel_size_nm") for f in frames if f.summary.get("pixel_size_nm")), None)
        particles = imagej_rows(particles, pixel)
        particle_cols = [*(n for n, _, _ in IMAGEJ_COLUMNS), *IMAGEJ_DERIVED, "Unit", *particle_cols]
    tables = {
        "particles": (particles, particle_cols),
        "frames": (frame_rows(frames), ["run_uid", "frame_uid", "seq_num"]),
        "run": (run_rows(stored, frames, rule), ["run_uid", "column", "edge_rule"]),
    }
    write = _write_parquet if fmt == "parquet" else _write_csv
    if fmt == "parquet":
        _pyarrow()  # fail before writing anything
    out.mkdir(parents=True, exist_ok=True)  # (an --out that is a file: refused by cmd_results first)
    paths = [out / f"{name}.{fmt}" for name in tables]
    with staged(paths) as temps:
        for (rows, first), tmp in zip(tables.values(), temps):
            write(tmp, rows, _columns(rows, first))
    lines = []
    for (name, (rows, _)), path in zip(tables.items(), paths):
        noun = "summary rows" if name == "run" else name
        lines.append(f"wrote {len(rows)} {noun} of run {run_uid} to {path}")
    return lines


@contextlib.contextmanager
def staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Temp files beside ``paths`` for the caller to write whole; when it is done all are renamed
    into place, and when it fails (disk full, an unwritable folder) they are removed and the
    earlier files stay as they were: no partial file. ``ResultsError`` before anything is written
    when a directory stands where a file goes. (The renames are one per file: a rename failing
    between two of them, which the checks make unlikely, would leave the first new.)"""
    for p in paths:
        if p.is_dir():
            raise ResultsError(f"--out {p.parent}: {p.name} there is a directory; nothing was written")
    temps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in paths]
    try:
        yield temps
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row, rounded; ImageJ's columns as the column they were taken from."""
    alias: dict[str, str] = {}
    if "Unit" in row:
        nm = row["Unit"] == "nm"
        alias = {name: c_nm if nm else c_px for name, c_nm, c_px in IMAGEJ_COLUMNS}
        alias |= {k: f"{k}_nm" if nm else f"{k}_px" for k in ("X", "Y", "Width", "Height")}
    return {k: round_value(alias.get(k, k), v) for k, v in row.items()}


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """UTF-8 whatever the locale (run metadata may hold any character)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(_rounded(r) for r in rows)  # None -> empty field


_STRING_COLUMNS = {"run_uid", "frame_uid", "model_version", "metadata", "mask_counts", "column", "edge_rule", "Unit"}
_INT_COLUMNS = {"seq_num", "idx", "count", "area_px", "mask_height", "mask_width", "frame_height", "frame_width",
                "counted", "touching_edge", "overlapped", "particles", "n_for_target"}  # fmt: skip
_BOOL_COLUMNS = set(COLUMNS_FLAG)


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
        if col in _BOOL_COLUMNS:
            return pa.bool_()
        if col in _INT_COLUMNS or col.startswith("invalid_"):
            return pa.int64()
        return pa.float64()

    def value(col: str, v: Any) -> Any:
        return bool(v) if col in _BOOL_COLUMNS and v is not None else v

    table = pa.table({c: pa.array([value(c, r.get(c)) for r in rows], type=arrow_type(c)) for c in columns})
    pa.parquet.write_table(table, path)
