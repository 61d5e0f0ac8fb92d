"""``nanoseg results list|export`` on a real result store."""

from __future__ import annotations

import csv
import json
import sqlite3
import sys

import numpy as np
import pytest

from nanoseg.cli import main
from nanoseg.masks import decode_rle
from nanoseg_daemon.contracts import FrameMetadata, RunStarted, RunStopped
from nanoseg_daemon.publish import event_data
from nanoseg_daemon.store import ResultStore, default_path
from tests.daemon.results_fixtures import WIRES, frame_result


@pytest.fixture
def state_dir(tmp_path):
    store = ResultStore(default_path(tmp_path))
    for uid, t in (("aaaa-1111", 1_700_000_000.0), ("bbbb-2222", 1_700_000_500.0)):
        store.add_run(RunStarted(uid, FrameMetadata(pixel_size_nm=5.0), {"uid": uid}, t), "test-model-1")
    for k in (1, 2, 3):
        store.add_frame(frame_result("aaaa-1111", k, n_wires=0 if k == 2 else 3))
    store.add_frame(frame_result("bbbb-2222", 1, n_wires=1, pixel_size_nm=None))
    store.stop_run(RunStopped("aaaa-1111", "success", 1_700_000_100.0))
    store.close()
    return tmp_path


def test_list_shows_runs_with_counts(state_dir, capsys):
    assert main(["results", "list", "--state-dir", str(state_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["RUN_UID", "STARTED"]
    a, b = (line.split() for line in lines[1:])
    assert a[0] == "aaaa-1111" and a[5:] == ["success", "3", "6", "test-model-1"]
    assert b[0] == "bbbb-2222" and b[4:] == ["running", "1", "1", "test-model-1"]

    assert main(["results", "list", "--db", str(default_path(state_dir)), "--json"]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["run_uid"], r["frames"], r["particles"]) for r in runs] == [("aaaa-1111", 3, 6), ("bbbb-2222", 1, 1)]


def test_list_shows_a_time_it_cannot_format_as_stored(state_dir, capsys):
    """A store written by an older daemon may hold a start time in ms (or any huge value): list
    prints it raw and still lists every run, instead of dying on the whole store."""
    store = ResultStore(default_path(state_dir))
    store.add_run(RunStarted("cccc-ms", FrameMetadata(), {"uid": "cccc-ms"}, 1_700_000_900.0), "m")
    store.close()
    with sqlite3.connect(default_path(state_dir)) as conn:
        conn.execute("UPDATE runs SET started_at = 1767225600500.0, stopped_at = 1e300 WHERE run_uid = 'cccc-ms'")
    conn.close()
    assert main(["results", "list", "--state-dir", str(state_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["aaaa-1111", "bbbb-2222", "cccc-ms"]
    assert lines[1].split()[1:3] == ["2023-11-14", "22:13:20"]
    assert lines[3].split()[1:3] == ["1767225600500.0", "1e+300"]


def test_export_csv(state_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["results", "export", "aaaa", "--state-dir", str(state_dir), "--out", str(out)]) == 0
    assert "wrote 6 particles of run aaaa-1111" in capsys.readouterr().out
    with (out / "particles.csv").open() as f:
        parts = list(csv.DictReader(f))
    with (out / "frames.csv").open() as f:
        frames = list(csv.DictReader(f))
    assert [(p["seq_num"], p["idx"]) for p in parts] == [(s, i) for s in ("1", "3") for i in "012"]
    ref = frame_result("aaaa-1111", 1).instances.masks
    for p, wire, mask in zip(parts[:3], WIRES, ref):
        assert float(p["length_px"]) == pytest.approx(wire[2], abs=1.0)
        assert float(p["width_nm"]) == pytest.approx(5.0 * wire[3], abs=5.0)
        rle = {"size": [int(p["mask_height"]), int(p["mask_width"])], "counts": p["mask_counts"]}
        np.testing.assert_array_equal(decode_rle(rle), mask)
    assert [(f["seq_num"], f["count"]) for f in frames] == [("1", "3"), ("2", "0"), ("3", "3")]
    assert float(frames[0]["length_px_mean"]) == pytest.approx(np.mean([w[2] for w in WIRES]), abs=0.5)
    assert frames[1]["length_px_mean"] == "" and frames[2]["invalid_saturated"] == "3"
    assert json.loads(frames[0]["metadata"])["sample"] == "V2O5"


def test_export_parquet_matches_csv(state_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["results", "export", "bbbb-2222", "--db", str(default_path(state_dir)),
                 "--format", "parquet", "--out", str(tmp_path / "pq")]) == 0  # fmt: skip
    parts = pq.read_table(tmp_path / "pq" / "particles.parquet")
    frames = pq.read_table(tmp_path / "pq" / "frames.parquet").to_pylist()
    assert parts.num_rows == 1 and str(parts.schema.field("area_px").type) == "int64"
    (p,) = parts.to_pylist()
    assert p["length_px"] == pytest.approx(WIRES[0][2], abs=1.0) and p["length_nm"] is None
    assert [f["frame_uid"] for f in frames] == ["bbbb-2222-ev1"] and frames[0]["count"] == 1


def test_export_errors(state_dir, tmp_path, capsys, monkeypatch):
    base = ["results", "export", "--state-dir", str(state_dir), "--out", str(tmp_path / "x")]
    assert main([*base[:2], "nope", *base[2:]]) == 2
    assert "no run" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    assert main([*base[:2], "aaaa-1111", *base[2:], "--format", "parquet"]) == 2
    assert "'pyarrow'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["results", "list", "--state-dir", str(tmp_path / "empty")]) == 2
    assert "no result store" in capsys.readouterr().err


def test_store_parquet_pandas_round_trip_equals_what_was_published(tmp_path):
    """Every particle column of the published event reads back from the Parquet export unchanged."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    store = ResultStore(default_path(tmp_path))
    store.add_run(RunStarted("run-rt", FrameMetadata(pixel_size_nm=5.0), {"uid": "run-rt"}, 1.0), "m@1")
    results = [frame_result("run-rt", k, n_wires=n) for k, n in ((1, 3), (2, 1), (3, 2))]
    published = [json.loads(event_data(r)["particles"])["columns"] for r in results]
    for r in results:
        store.add_frame(r)
    store.close()
    out = tmp_path / "pq"
    assert main(["results", "export", "run-rt", "--state-dir", str(tmp_path), "--format", "parquet",
                 "--out", str(out)]) == 0  # fmt: skip
    df = pd.read_parquet(out / "particles.parquet")
    assert len(df) == 6 and df["touches_edge"].dtype == bool and df["area_px"].dtype == np.int64
    for name in published[0]:
        expected = [v for cols in published for v in cols[name]]
        got = df[name].tolist()
        assert [None if isinstance(v, float) and np.isnan(v) else v for v in got] == expected, name
    frames = pd.read_parquet(out / "frames.parquet")
    assert frames["length_px_median_lo"].iloc[0] == results[0].summary.stats["length_px"].median_lo
    assert frames["edge_rule"].tolist() == ["include"] * 3


def test_export_imagej_names_rounding_and_run_summary(state_dir, tmp_path):
    out = tmp_path / "ij"
    assert main(["results", "export", "aaaa", "--state-dir", str(state_dir), "--out", str(out),
                 "--names", "imagej", "--edge-rule", "exclude"]) == 0  # fmt: skip
    with (out / "particles.csv").open() as f:
        reader = csv.DictReader(f)
        parts = list(reader)
        header = reader.fieldnames or []
    assert header[:18] == ["Area", "Perim.", "Major", "Minor", "Angle", "Circ.", "Feret", "FeretAngle", "MinFeret",
                           "Solidity", "AR", "Round", "X", "Y", "Width", "Height", "Mean", "Unit"]  # fmt: skip
    for p, wire in zip(parts, WIRES):
        assert p["Unit"] == "nm" and p["MinFeret"] == p["min_feret_nm"] and p["Area"] == p["area_nm2"]
        assert float(p["MinFeret"]) == pytest.approx(5.0 * wire[3], abs=5.0)
        assert len(p["length_px"].partition(".")[2]) <= 2 and len(p["length_nm"].partition(".")[2]) <= 1
        assert float(p["Width"]) == pytest.approx(5.0 * float(p["bbox_width_px"])) and p["Mean"] == ""
        assert float(p["AR"]) == pytest.approx(float(p["Major"]) / float(p["Minor"]), rel=5e-3)  # of rounded axes
    with (out / "run.csv").open() as f:
        run = {r["column"]: r for r in csv.DictReader(f)}
    length = run["length_px"]
    assert length["edge_rule"] == "exclude" and length["particles"] == "6"
    assert float(length["median_lo"]) <= float(length["median"]) <= float(length["median_hi"])
    touching = sum(int(p["touches_edge"]) for p in parts)
    assert int(length["counted"]) == 6 - touching
    assert float(run["length_nm"]["median"]) == pytest.approx(5.0 * float(length["median"]), abs=0.1)


def test_report_writes_figure_and_page_with_the_run_summary(state_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["results", "report", "aaaa", "--state-dir", str(state_dir), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (out / "report.html").read_text()
    assert "counting rule" in page.lower() and "<b>include</b>" in page and "data:image/png;base64," in page
    assert page.count("<tr>") == 1 + 11  # header + the interval columns in px and nm
    assert "<td>length_nm</td>" in page
