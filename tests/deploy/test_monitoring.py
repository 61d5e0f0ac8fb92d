"""deploy/prometheus and deploy/grafana: rules and dashboard against the daemon's real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nanoseg_daemon.metrics import DaemonMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "nanoseg_rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "nanoseg_rules_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "nanoseg_dashboard.json"
PLACEHOLDERS = {"nanoseg_triton_up"}  # documented in the rules file's header, exported by no code yet
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "info": ("_info",)}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian: apt-get install prometheus)")


def exported() -> dict[str, str]:
    """Series name -> metric family, for every metric DaemonMetrics registers."""
    out = {}
    for family in DaemonMetrics().registry.collect():
        for suffix in SUFFIXES[family.type]:
            out[family.name + suffix] = family.name
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bnanoseg_[a-z0-9_]+", expr))


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    """Alerts fire when they should and stay silent when paused, idle or on duplicates."""
    proc = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # Grafana's variables become what they stand for, then promtool parses each query as a rule
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
    records = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        records.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_cover_the_required_alerts_with_real_metric_names() -> None:
    names = exported()
    alerts = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    assert {"NanosegDaemonDown", "NanosegNoFramesWhileRunOpen", "NanosegFramesDropped", "NanosegLatencyHigh",
            "NanosegModelReloadFailed", "NanosegTritonUnreachable"} <= set(alerts)
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert used - names.keys() == PLACEHOLDERS
    header = RULES.read_text().split("groups:")[0]
    assert all(p in header for p in PLACEHOLDERS)
    no_frames = alerts["NanosegNoFramesWhileRunOpen"]
    assert "nanoseg_open_runs" in no_frames and "nanoseg_last_frame_timestamp_seconds" in no_frames
    assert 'nanoseg_model_reloads_total{result="failed"}' in alerts["NanosegModelReloadFailed"]
    latency = next(r["expr"] for r in rules() if r.get("record") == "nanoseg:frame_latency_seconds:p95_5m")
    assert "nanoseg_frame_latency_seconds_bucket" in latency


# The operational metrics of daemon/metrics.py (families), all of which the dashboard shows.
OPERATIONAL = {
    "nanoseg_frames_received", "nanoseg_frames_processed", "nanoseg_frames_dropped", "nanoseg_frames_failed",
    "nanoseg_messages_rejected", "nanoseg_stage_seconds", "nanoseg_frame_latency_seconds", "nanoseg_queue_depth",
    "nanoseg_particles_per_frame", "nanoseg_last_frame_timestamp_seconds", "nanoseg_open_runs", "nanoseg_model",
    "nanoseg_model_reloads", "nanoseg_store_errors", "nanoseg_publish_dropped", "nanoseg_paused", "nanoseg_ready",
}


def test_dashboard_shows_the_operational_metrics_by_their_exported_names() -> None:
    names = exported()
    assert set(names.values()) >= OPERATIONAL
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used <= names.keys(), used - names.keys()
    assert {names[n] for n in used} >= OPERATIONAL


def test_dashboard_layout() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables == {"datasource", "instance"}
