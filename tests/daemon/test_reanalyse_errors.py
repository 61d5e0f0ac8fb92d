"""``nanoseg reanalyse`` when Tiled cannot be reached: one line naming the server, exit 2.

tiled's client retries a refused connection with backoff (``stamina``, ~30 s); the tests make it
try once (``stamina.set_testing``), which changes how long, not what, the command reports."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from nanoseg.cli import main

pytest.importorskip("tiled.client", reason="tiled not installed (pip install -e '.[dev]')")


@pytest.fixture(autouse=True)
def one_attempt() -> Iterator[None]:
    stamina = pytest.importorskip("stamina")
    with stamina.set_testing(True, attempts=1):
        yield


def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_an_unreachable_tiled_is_named(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = url.format(port=free_port())
    rc = main(["reanalyse", "some-run", "--tiled", url, "--set", "tiled.timeout_s=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanoseg reanalyse:")]
    assert rc == 2 and len(err) == 1 and f"Tiled at {url}:" in err[0] and "nothing was written" in err[0]
