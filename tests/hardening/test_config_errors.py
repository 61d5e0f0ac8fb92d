"""`nanoseg serve` refuses a bad configuration before starting anything: exit code 2, the field named.

Each case is a real subprocess on a YAML file (all started at once, they only parse and exit).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.hardening.hardening_fixtures import make_certificates

# name -> (config fragment merged over a valid base, text that must appear on stderr)
CASES: dict[str, tuple[dict, str]] = {
    "queue_size_text": ({"queue": {"size": "many"}}, "queue.size: Input should be a valid integer"),
    "threads_fraction": ({"model": {"threads": 1.5}}, "model.threads: Input should be a valid integer"),
    "policy_unknown": ({"queue": {"policy": "sometimes"}}, "queue.policy: Input should be 'block', 'drop_oldest' or 'latest_only'"),
    "port_text": ({"metrics": {"port": "http"}}, "metrics.port: Input should be a valid integer"),
    "nested_list": ({"ingest": {"raw": {"max_open_runs": [1, 2]}}}, "ingest.raw.max_open_runs: Input should be a valid integer"),
    "section_scalar": ({"store": "fast"}, "store: Input should be a valid dictionary"),
    "unknown_top_key": ({"colour": "red"}, "colour: unknown key"),
    "unknown_nested_key": ({"ingest": {"raw": {"bnd": "tcp://*:5570"}}}, "ingest.raw.bnd: unknown key"),
    "misspelt_publish_key": ({"publish": {"summary": {"adress": "tcp://*:1"}}}, "publish.summary.adress: unknown key"),
    "model_missing": ({"model": {"path": "/nonexistent/model.pt"}}, "model.path: no such file: /nonexistent/model.pt"),
    "onnx_missing": ({"model": {"onnx_path": "/nonexistent/model.onnx"}}, "model.onnx_path: no such file"),
    "control_key_missing": ({"control": {"curve": {"server_secret_key": "/nonexistent/server.key_secret"}}},
                            "control.curve.server_secret_key: no such file"),
    "clients_dir_missing": ({"ingest": {"curve": {"server_secret_key": "KEY", "authorized_clients_dir": "/nonexistent/clients"}}},
                            "ingest.curve.authorized_clients_dir: no such directory"),
    "publish_curve_without_server_key": ({"publish": {"curve": {"authorized_clients_dir": "/tmp"}}},
                                         "publish: curve.server_secret_key is needed"),
    "profile_unknown": ({"profile": "no_such_profile"}, "profile: no profiles config 'no_such_profile'"),
    "triton_without_server": ({"model": {"engine": "triton", "triton_model": "nanoseg"}},
                              "engine triton needs model.triton_url (HOST:PORT) and model.triton_model"),
    "sink_unknown": ({"sinks": ["store", "tiles"]}, "sinks.1: Input should be 'store', 'bluesky', 'summary' or 'tiled'"),
    "sink_store_after_publisher": ({"sinks": ["summary", "store"]}, "sinks: store must come first"),
    "sink_listed_but_disabled": ({"sinks": ["store", "bluesky"], "publish": {"bluesky": {"enabled": False}}},
                                 "sinks: bluesky listed but publish.bluesky.enabled is false"),
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def serve(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOSEG__")}
    return subprocess.Popen([sys.executable, "-m", "nanoseg.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_bad_configs_fail_at_start_naming_the_field(tmp_path: Path, trained_model_path: Path) -> None:
    keys = make_certificates(tmp_path / "keys", "server")
    procs = {}
    for name, (fragment, _) in CASES.items():
        state = tmp_path / name / "state"
        base = {"model": {"path": str(trained_model_path), "engine": "torch", "threads": 1},
                "store": {"state_dir": str(state)}, "ingest": {"bluesky": {"enabled": False}},
                "metrics": {"port": 0}}
        text = yaml.safe_dump(merge(base, fragment)).replace("KEY", str(keys["server"][1]))
        config = tmp_path / name / "daemon.yaml"
        config.parent.mkdir()
        config.write_text(text)
        procs[name] = (serve(config), config)
    missing = tmp_path / "no_such.yaml"
    procs["config_file_missing"] = (serve(missing), missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {path: [unclosed\n")
    procs["config_not_yaml"] = (serve(broken), broken)
    expected = {name: text for name, (_, text) in CASES.items()}
    expected["config_file_missing"] = f"{missing}: cannot read config: No such file or directory"
    expected["config_not_yaml"] = f"{broken}: not valid YAML"

    failures = []
    for name, (proc, config) in procs.items():
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 2 or expected[name] not in err:
            failures.append(f"{name}: exit {proc.returncode}, stderr {err.strip()[-400:]!r}")
        elif name in CASES:
            assert str(config) in err  # the file is named too
            assert not (tmp_path / name / "state").exists()  # nothing started
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("value", ["ten", "-3"])
def test_bad_override_fails_naming_the_field(tmp_path: Path, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOSEG__")}
    env["NANOSEG__QUEUE__SIZE"] = value
    proc = subprocess.run([sys.executable, "-m", "nanoseg.cli", "serve"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "queue.size" in proc.stderr
