"""deploy/install.sh staged into a temporary DESTDIR: layout, modes, and idempotence."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install.sh"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (Debian: apt-get install shellcheck)")
def test_shellcheck_is_clean() -> None:
    proc = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a wheel, built from a copy of the sources (the checkout stays untouched)."""
    src = tmp_path_factory.mktemp("src")
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name in package_dirs.values():
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("nanoseg-*.whl")
    return whl


def install(destdir: Path, wheel: Path, model: Path) -> str:
    # --no-deps: the test checks the layout, not a 2 GB torch install; --no-keys: key generation
    # needs pyzmq inside the new venv, which --no-deps leaves out.
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--destdir", str(destdir), "--python", sys.executable,
         "--source", str(wheel), "--pip-args", "--no-deps --no-index", "--no-keys",
         "--model", str(model)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode, size, mtime_ns, link target) of everything below root."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        target = os.readlink(path) if path.is_symlink() else ""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staged_install_layout_and_idempotence(tmp_path: Path, wheel: Path) -> None:
    dest = tmp_path / "root"
    v7 = tmp_path / "registry" / "v7" / "model.pt"
    v7.parent.mkdir(parents=True)
    v7.write_bytes(b"checkpoint v7")
    first = install(dest, wheel, v7)
    assert "created venv" in first and "models/current -> v7" in first

    venv = dest / "opt" / "nanoseg" / "venv"
    entry = venv / "bin" / "nanoseg"
    assert entry.read_text().splitlines()[0] == f"#!{venv}/bin/python"  # staged venvs point into DESTDIR
    etc = dest / "etc" / "nanoseg"
    shipped = (REPO / "configs" / "daemon" / "beamline.yaml").read_text()
    assert (etc / "daemon.yaml").read_text() == shipped == (etc / "daemon.yaml.dist").read_text()
    assert mode(etc) == 0o750 and mode(etc / "daemon.yaml") == 0o640 and mode(etc / "keys") == 0o750
    assert (etc / "keys" / "authorized").is_dir()
    for name in ("nanoseg.service", "nanoseg-proxy.service"):
        installed = dest / "etc" / "systemd" / "system" / name
        assert installed.read_text() == (REPO / "systemd" / name).read_text() and mode(installed) == 0o644
    state = dest / "var" / "lib" / "nanoseg"
    assert mode(state) == 0o750 and mode(state / "models") == 0o755
    assert os.readlink(state / "models" / "current") == "v7"
    assert (state / "models" / "current" / "model.pt").read_bytes() == b"checkpoint v7"
    assert mode(dest / "var" / "cache" / "nanoseg") == 0o750

    # a rerun changes nothing at all
    before = snapshot(dest)
    second = install(dest, wheel, v7)
    assert "created venv" not in second and "wrote" not in second
    assert snapshot(dest) == before

    # an operator's config and the current model survive an upgrade; the template is refreshed
    (etc / "daemon.yaml").write_text(shipped + "queue: {size: 64, policy: block}\n")
    (etc / "daemon.yaml.dist").write_text("stale\n")
    v8 = tmp_path / "registry" / "v8" / "model.pt"
    v8.parent.mkdir()
    v8.write_bytes(b"checkpoint v8")
    install(dest, wheel, v8)
    assert (etc / "daemon.yaml").read_text().endswith("queue: {size: 64, policy: block}\n")
    assert (etc / "daemon.yaml.dist").read_text() == shipped
    assert (state / "models" / "v8" / "model.pt").read_bytes() == b"checkpoint v8"
    assert os.readlink(state / "models" / "current") == "v7"


def test_other_prefix_is_written_into_the_units(tmp_path: Path, wheel: Path) -> None:
    model = tmp_path / "m" / "default" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"x")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--destdir", str(tmp_path / "root"), "--prefix", "/srv/nanoseg",
         "--python", sys.executable, "--source", str(wheel), "--pip-args", "--no-deps --no-index",
         "--no-keys", "--model", str(model)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    unit = (tmp_path / "root" / "etc" / "systemd" / "system" / "nanoseg.service").read_text()
    assert "ExecStart=/srv/nanoseg/venv/bin/nanoseg serve --config /etc/nanoseg/daemon.yaml" in unit
    assert "/opt/nanoseg" not in unit
    assert (tmp_path / "root" / "srv" / "nanoseg" / "venv" / "bin" / "nanoseg").exists()


def test_bad_option_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--destdir", str(tmp_path), "--frobnicate"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr
    assert not any(tmp_path.iterdir())
