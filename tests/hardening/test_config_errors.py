"""`nanoseg serve` refuses a bad configuration before starting anything: exit code 2, the field named.

Every case goes through ``load_daemon_config`` and ``check_files``, the two calls ``nanoseg serve``
makes first, in this process (each `nanoseg serve` process imports torch to parse its config, a
few seconds of CPU apiece). Three of them (a field of the file, a file it names, the environment)
also run as real `nanoseg serve` subprocesses, all started at once: those prove the exit code, the
message on stderr and that nothing started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanoseg.config_io import ConfigError
from nanoseg_daemon.config import check_files, load_daemon_config
from tests.hardening.hardening_fixtures import make_certificates

# name -> (config fragment merged over a valid base, text that must appear in the error)
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
# a field of the file, a file it names: these also run as `nanoseg serve` subprocesses
IN_SUBPROCESS = ("queue_size_text", "model_missing")


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_case(directory: Path, name: str, model: Path, server_key: Path) -> Path:
    """The daemon YAML of case ``name``: a valid base with the case's fragment merged over it."""
    base = {"model": {"path": str(model), "engine": "torch", "threads": 1},
            "store": {"state_dir": str(directory / name / "state")}, "ingest": {"bluesky": {"enabled": False}},
            "metrics": {"port": 0}}
    config = directory / name / "daemon.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(merge(base, CASES[name][0])).replace("KEY", str(server_key)))
    return config


def refusal(config: Path | None, environ: dict[str, str] | None = None) -> str:
    """The ConfigError text of what `nanoseg serve --config CONFIG` checks before starting."""
    with pytest.raises(ConfigError) as err:
        check_files(load_daemon_config(config, environ=environ or {}), str(config or "<defaults>"))
    return str(err.value)


@pytest.fixture(scope="module")
def server_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("keys"), "server")["server"][1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_is_refused_naming_the_field_and_the_file(
    name: str, tmp_path: Path, trained_model_path: Path, server_key: Path
) -> None:
    config = write_case(tmp_path, name, trained_model_path, server_key)
    text = refusal(config)
    assert CASES[name][1] in text and str(config) in text


def test_missing_or_broken_config_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no_such.yaml"
    assert f"{missing}: cannot read config: No such file or directory" in refusal(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {path: [unclosed\n")
    assert f"{broken}: not valid YAML" in refusal(broken)


@pytest.mark.parametrize("value", ["ten", "-3"])
def test_bad_override_in_the_environment_is_refused_naming_the_field(value: str) -> None:
    assert "queue.size" in refusal(None, {"NANOSEG__QUEUE__SIZE": value})


def serve(config: Path | None, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NANOSEG__")}
    args = ["--config", str(config)] if config is not None else []
    return subprocess.Popen([sys.executable, "-m", "nanoseg.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**environ, **env})


def test_nanoseg_serve_exits_2_naming_the_field_and_starts_nothing(
    tmp_path: Path, trained_model_path: Path, server_key: Path
) -> None:
    procs: dict[str, tuple[subprocess.Popen[str], Path | None, str]] = {}
    for name in IN_SUBPROCESS:
        written = write_case(tmp_path, name, trained_model_path, server_key)
        procs[name] = (serve(written), written, CASES[name][1])
    procs["environment"] = (serve(None, NANOSEG__QUEUE__SIZE="ten"), None, "queue.size")

    failures = []
    try:
        for name, (proc, config, expected) in procs.items():
            _, err = proc.communicate(timeout=180)
            if proc.returncode != 2 or "nanoseg serve: error: " not in err or expected not in err:
                failures.append(f"{name}: exit {proc.returncode}, stderr {err.strip()[-400:]!r}")
            elif name in CASES:
                assert str(config) in err  # the file is named too
                assert not (tmp_path / name / "state").exists()  # nothing started
    finally:  # none left running into the next tests
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    assert not failures, "\n".join(failures)
