"""Fixtures shared by the daemon's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.daemon.tiled_fixtures import tiled_serve


@pytest.fixture(scope="session")
def tiled_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``tiled serve catalog --temp`` for the session; each test writes into its own container."""
    pytest.importorskip("tiled.server", reason="tiled[server] not installed (pip install -e '.[dev]')")
    with tiled_serve(tmp_path_factory.mktemp("tiled")) as url:
        yield url
