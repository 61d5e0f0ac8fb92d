"""``nanoseg models`` against hostile input: a registry that is missing, dangling, hand-edited or
from a newer nanoseg, bad flags, unreachable daemons. Each gives one line naming the problem, a
non-zero exit, and leaves the registry (and a Triton repository) consistent.

Registries are written by hand (``make_registry``: model.pt is the trained model), so only the
tests that evaluate need the model to run (one 512 x 512 validation image).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from nanoseg.checkpoint import file_sha256
from nanoseg.cli import main
from tests.offline_training.registry_fixtures import validation_set
from tests.offline_training.test_registry_errors import make_registry, models


@pytest.fixture(scope="module")
def val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return validation_set(tmp_path_factory.mktemp("val") / "val", count=1)


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_onnx(reg: Path, data: bytes) -> None:
    """Give v0001 a model.onnx of ``data``, its checksum in the manifest (consistent, so verified)."""
    d = reg / "versions" / "v0001"
    (d / "model.onnx").write_bytes(data)
    man = json.loads((d / "manifest.json").read_text())
    man["artifacts"]["model.onnx"] = {"sha256": file_sha256(d / "model.onnx"), "bytes": len(data)}
    (d / "manifest.json").write_text(json.dumps(man))


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", [["list"], ["show", "v1"], ["rollback"], ["export-triton", "v1", "--repo", "R"]])
def test_a_missing_registry_is_named_and_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     command: list[str]) -> None:
    root = tmp_path / "typo"
    command = [str(tmp_path / "repo") if c == "R" else c for c in command]
    rc, err = models(capsys, *command, "--registry", str(root))
    assert rc == 2 and f"{root}: no registry there" in one_line(err)
    assert not root.exists() and not (tmp_path / "repo").exists()


def test_a_registry_path_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = models(capsys, "list", "--registry", str(f))
    assert rc == 2 and "not a directory" in one_line(err)


def test_a_dangling_current_is_reported_and_force_repairs_it(tmp_path: Path, trained_model_path: Path, val: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    os.remove(reg / "current")
    os.symlink("versions/v0009", reg / "current")
    rc, err = models(capsys, "list", "--registry", str(reg))
    assert rc == 1 and "points to v0009, which is not in the registry" in one_line(err)
    rc, err = models(capsys, "show", "current", "--registry", str(reg))
    assert rc == 2 and "points to v0009" in one_line(err)

    ev = ["--val", str(val), "--limit", "1", "--threads", "1"]
    rc, err = models(capsys, "promote", "v1", "--registry", str(reg), *ev)
    assert rc == 2 and "the current version v0009 cannot be evaluated" in one_line(err) and "--force" in err
    assert os.readlink(reg / "current") == "versions/v0009"
    rc, _ = models(capsys, "promote", "v1", "--registry", str(reg), *ev, "--force")
    assert rc == 0 and os.readlink(reg / "current") == "versions/v0001"


def test_a_current_that_is_not_a_symlink_is_refused_before_evaluating(
        tmp_path: Path, trained_model_path: Path, val: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    os.remove(reg / "current")
    (reg / "current").mkdir()
    rc, err = models(capsys, "promote", "v1", "--registry", str(reg), "--val", str(val), "--limit", "1")
    assert rc == 2 and f"{reg / 'current'}: not a symlink" in one_line(err)
    assert not any(p.name.startswith(".current") for p in reg.iterdir()) and not (reg / "evaluations").exists()


def test_a_manifest_of_a_newer_format_is_named(tmp_path: Path, trained_model_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    m = reg / "versions" / "v0001" / "manifest.json"
    m.write_text(m.read_text().replace("nanoseg-registry-manifest/1", "nanoseg-registry-manifest/2"))
    rc, err = models(capsys, "show", "v1", "--registry", str(reg))
    assert rc == 2 and str(m) in one_line(err) and "'nanoseg-registry-manifest/2'" in err and "newer" in err


def test_register_with_a_missing_plan_leaves_nothing(tmp_path: Path, trained_model_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "reg"
    rc, err = models(capsys, "register", str(trained_model_path), "--plan", str(tmp_path / "none.plan"),
                     "--registry", str(root))
    assert rc == 2 and "--plan" in one_line(err) and "nothing was registered" in err
    assert not (root / "versions").exists() and not (root / "history.jsonl").exists()


def test_register_with_a_bad_val_registers_nothing(tmp_path: Path, trained_model_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "reg"
    rc, err = models(capsys, "register", str(trained_model_path), "--val", str(tmp_path / "noval"),
                     "--registry", str(root))
    assert rc == 2 and f"--val {tmp_path / 'noval'}: no annotations.json" in one_line(err)
    assert not (root / "versions").exists()


def test_promote_with_a_bad_val_leaves_no_evaluation_behind(tmp_path: Path, trained_model_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001", "v0002"))
    rc, err = models(capsys, "promote", "v1", "--registry", str(reg), "--val", str(tmp_path / "noval"))
    assert rc == 2 and "no annotations.json" in one_line(err)
    assert not (reg / "evaluations").exists() and os.readlink(reg / "current") == "versions/v0002"


def test_promote_with_an_unreachable_daemon_says_what_state_it_left(
        tmp_path: Path, trained_model_path: Path, val: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    os.remove(reg / "current")
    (reg / "history.jsonl").write_text("")
    addr = f"tcp://127.0.0.1:{free_port()}"
    rc = main(["models", "promote", "v1", "--registry", str(reg), "--val", str(val), "--limit", "1",
               "--notify", addr, "--timeout", "0.5"])
    out, err = capsys.readouterr()
    assert rc == 1 and os.readlink(reg / "current") == "versions/v0001"
    state = [line for line in err.splitlines() if line.startswith("nanoseg models promote:")]
    assert len(state) == 1 and "v0001 is current now" in state[0] and f"{addr} (TimeoutError" in state[0]
    assert "1 of 1 daemons did not reload" in state[0]
    assert json.loads(out.splitlines()[-1])["daemons"][0]["ok"] is False


@pytest.mark.parametrize(("flags", "named"), [
    (["--gpus", "a,b"], "--gpus 'a,b'"), (["--instances", "0"], "--instances 0"),
    (["--max-batch", "0"], "--max-batch 0"), (["--cpu-threads", "0"], "--cpu-threads 0"),
    (["--queue-delay-us", "-1"], "--queue-delay-us -1"), (["--name", ".."], "--name '..'"),
    (["--name", "a/b"], "--name 'a/b'"),
])
def test_export_triton_bad_flags_write_nothing(tmp_path: Path, trained_model_path: Path,
                                               capsys: pytest.CaptureFixture[str], flags: list[str],
                                               named: str) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    rc, err = models(capsys, "export-triton", "v1", "--repo", str(tmp_path / "repo"), "--registry", str(reg), *flags)
    assert rc == 2 and named in one_line(err)
    assert not (tmp_path / "repo").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["reg"]


def test_export_triton_to_a_file_or_below_one(tmp_path: Path, trained_model_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    with_onnx(reg, b"graph")
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = models(capsys, "export-triton", "v1", "--repo", str(f), "--registry", str(reg))
    assert rc == 2 and f"--repo {f}: exists and is not a directory" in one_line(err)
    rc, err = models(capsys, "export-triton", "v1", "--repo", str(f / "sub"), "--registry", str(reg))
    assert rc == 2 and f"{f / 'sub'}: Not a directory" in one_line(err)


def test_export_triton_failing_part_way_keeps_the_served_model(tmp_path: Path, trained_model_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A version whose (checksummed) model.onnx is not ONNX fails after the writing began: the
    repository keeps the model it served, and no temp directory stays in it (Triton polls it)."""
    reg = make_registry(tmp_path / "reg", trained_model_path, ("v0001",))
    with_onnx(reg, b"not an onnx graph" * 64)
    repo = tmp_path / "repo"
    (repo / "nanoseg" / "7").mkdir(parents=True)
    (repo / "nanoseg" / "config.pbtxt").write_text('name: "nanoseg"\n')
    (repo / "nanoseg" / "7" / "model.onnx").write_bytes(b"served")
    rc, err = models(capsys, "export-triton", "v1", "--repo", str(repo), "--registry", str(reg))
    assert rc == 2 and "v0001/model.onnx: not a readable ONNX model" in one_line(err)
    assert sorted(p.name for p in repo.iterdir()) == ["nanoseg"]
    assert (repo / "nanoseg" / "7" / "model.onnx").read_bytes() == b"served"
