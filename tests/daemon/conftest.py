"""Fixtures shared by the daemon's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nanoseg_daemon.service import Service
from tests.daemon.service_fixtures import start_service
from tests.daemon.tiled_fixtures import tiled_serve


@pytest.fixture
def null_service(tmp_path: Path, trained_model_path: Path) -> Iterator[Service]:
    """A running daemon on engine ``null`` (the tests' trained model's config), stopped cleanly after."""
    service = start_service(tmp_path / "state", trained_model_path, **{"model.engine": "null"})
    try:
        yield service
    finally:
        assert service.stop()


@pytest.fixture(scope="session")
def tiled_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the session's Tiled server may read (detectors write their HDF5 files there)."""
    return tmp_path_factory.mktemp("tiled_files")


@pytest.fixture(scope="session")
def tiled_url(tmp_path_factory: pytest.TempPathFactory, tiled_files: Path) -> Iterator[str]:
    """A real ``tiled serve catalog --temp`` for the session; each test writes into its own container."""
    pytest.importorskip("tiled.server", reason="tiled[server] not installed (pip install -e '.[dev]')")
    with tiled_serve(tmp_path_factory.mktemp("tiled"), tiled_files) as url:
        yield url
