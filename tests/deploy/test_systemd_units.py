"""systemd/*.service: `systemd-analyze verify` passes, and the settings the daemon relies on hold."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseg_daemon.config import load_daemon_config

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
INSTALLED_VENV = "/opt/nanoseg/venv"


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def seconds(value: str) -> float:
    """A systemd time span of the forms used here: '30', '30s', '5min', '1min 30s'."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[suffix]
    return total


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point the units at this checkout's venv, which holds
    # the same entry points (nanoseg, bluesky-0MQ-proxy) that install.sh puts in /opt/nanoseg/venv.
    venv = Path(sys.prefix)
    assert (venv / "bin" / "nanoseg").exists() and (venv / "bin" / "bluesky-0MQ-proxy").exists()
    paths = []
    for path in sorted(UNITS.glob("*.service")):
        text = path.read_text()
        assert INSTALLED_VENV in text, f"{path.name} should run from {INSTALLED_VENV}"
        (tmp_path / path.name).write_text(text.replace(INSTALLED_VENV, str(venv)))
        paths.append(str(tmp_path / path.name))
    assert len(paths) == 2
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and unparsable values, printing warnings: both must be clean
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), proc.stderr


def test_daemon_unit_is_a_hardened_notify_service_that_outlives_the_drain() -> None:
    svc = unit("nanoseg.service")["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    assert svc["ExecStart"] == f"{INSTALLED_VENV}/bin/nanoseg serve --config /etc/nanoseg/daemon.yaml"
    assert svc["StateDirectory"] == "nanoseg" and svc["ConfigurationDirectory"] == "nanoseg"
    assert svc.get("User") == "nanoseg" or svc.get("DynamicUser") == "yes"
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "read-only", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": ""}.items():
        assert svc[key] == value, key
    assert "/var/lib/nanoseg/models" in svc["ReadOnlyPaths"]
    # the watchdog fires only if the daemon's pings (every <= 1 s) stop for WatchdogSec
    assert 10 <= seconds(svc["WatchdogSec"]) <= 120
    drain = load_daemon_config(REPO / "configs" / "daemon" / "beamline.yaml", environ={}).shutdown.drain_timeout_s
    assert seconds(svc["TimeoutStopSec"]) > drain + 5, "systemd would SIGKILL a draining daemon"


def test_proxy_unit_serves_bluesky_ports_5567_and_5568() -> None:
    svc = unit("nanoseg-proxy.service")["Service"]
    cmd = svc["ExecStart"].split()
    assert cmd[0] == f"{INSTALLED_VENV}/bin/bluesky-0MQ-proxy"
    assert cmd[cmd.index("--in-address") + 1].endswith(":5567")
    assert cmd[cmd.index("--out-address") + 1].endswith(":5568")
    assert unit("nanoseg.service")["Unit"]["After"].split().count("nanoseg-proxy.service") == 1
