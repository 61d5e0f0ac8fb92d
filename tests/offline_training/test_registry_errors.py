"""``nanoseg models`` on a damaged registry: one line naming the file, exit 2, nothing switched.

The registry is written by hand (one or two versions whose model.pt is the trained model), so no
ONNX export is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from nanoseg.checkpoint import file_sha256
from nanoseg.cli import main
from nanoseg_training.promotion import check_addresses
from nanoseg_training.registry import RegistryError


def make_registry(root: Path, model: Path, versions: tuple[str, ...] = ("v0001",)) -> Path:
    for v in versions:
        d = root / "versions" / v
        d.mkdir(parents=True)
        shutil.copyfile(model, d / "model.pt")
        man = {"format": "nanoseg-registry-manifest/1", "version": v, "created": "2025-01-01T00:00:00Z",
               "source": str(model), "artifacts": {"model.pt": {"sha256": file_sha256(d / "model.pt"),
                                                                "bytes": (d / "model.pt").stat().st_size}},
               "architecture": {}, "model_config": {}, "input_spec": {}, "onnx_io": {}, "training": {}}
        (d / "manifest.json").write_text(json.dumps(man))
    os.symlink(f"versions/{versions[-1]}", root / "current")
    (root / "history.jsonl").write_text("".join(json.dumps({"time": "t", "action": "promote", "version": v}) + "\n"
                                                for v in versions))
    return root


def models(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["models", *args])
    return rc, capsys.readouterr().err.strip()


def test_list_with_a_truncated_manifest(tmp_path: Path, trained_model_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path)
    assert models(capsys, "list", "--registry", str(reg))[0] == 0
    m = reg / "versions" / "v0001" / "manifest.json"
    m.write_text(m.read_text()[:100])
    rc, err = models(capsys, "list", "--registry", str(reg))
    assert rc == 2 and len(err.splitlines()) == 1 and str(m) in err and "unreadable manifest" in err


@pytest.mark.parametrize(("history", "cause"), [
    ('{"time": "t", "action": "promote", "version": "v0001"}\n{"time": "t", "act', "line 2 is not valid JSON"),
    ('{"time": "t", "version": "v0001"}\n', "line 1: field 'action' is missing"),
    ('[1, 2]\n', "line 1 is not a JSON object"),
])
def test_rollback_with_a_malformed_history(tmp_path: Path, trained_model_path: Path,
                                           capsys: pytest.CaptureFixture[str], history: str, cause: str) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001", "v0002"))
    (reg / "history.jsonl").write_text(history)
    rc, err = models(capsys, "rollback", "--registry", str(reg))
    assert rc == 2 and len(err.splitlines()) == 1 and str(reg / "history.jsonl") in err and cause in err
    assert os.readlink(reg / "current") == "versions/v0002"


def test_rollback_with_a_malformed_notify_address_switches_nothing(tmp_path: Path, trained_model_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001", "v0002"))
    before = (reg / "history.jsonl").read_text()
    rc, err = models(capsys, "rollback", "--registry", str(reg), "--notify", "localhost:5580",
                     "--notify", "tcp://127.0.0.1:1", "--timeout", "1")
    assert rc == 2 and len(err.splitlines()) == 1 and "'localhost:5580'" in err and "tcp://127.0.0.1:1" not in err
    assert os.readlink(reg / "current") == "versions/v0002" and (reg / "history.jsonl").read_text() == before


def test_rollback_notifies_every_daemon_and_reports_each(tmp_path: Path, trained_model_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Unreachable daemons are reported one by one; the switch and the summary still happen."""
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001", "v0002"))
    rc = main(["models", "rollback", "--registry", str(reg), "--notify", "tcp://127.0.0.1:1",
               "--notify", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and os.readlink(reg / "current") == "versions/v0001"
    assert [d["address"] for d in out["daemons"]] == ["tcp://127.0.0.1:1", f"ipc://{tmp_path}/none.sock"]
    assert not any(d["ok"] for d in out["daemons"])


@pytest.mark.parametrize("addr", ["localhost:5580", "tcp://host", "tcp://host:99999", "tcp://:5580", "http://h:1", ""])
def test_check_addresses_refuses(addr: str) -> None:
    with pytest.raises(RegistryError, match="malformed daemon address"):
        check_addresses(["tcp://127.0.0.1:5580", addr])


def test_check_addresses_accepts() -> None:
    check_addresses(["tcp://127.0.0.1:5580", "tcp://daemon-3.lab:5580", "tcp://[::1]:5580", "ipc:///run/n.sock",
                     "inproc://x"])


def test_registry_error_is_a_config_error() -> None:
    from nanoseg.config_io import ConfigError

    assert issubclass(RegistryError, ConfigError) and issubclass(RegistryError, ValueError)
