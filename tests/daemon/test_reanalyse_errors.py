"""``nanoseg reanalyse`` when Tiled cannot be reached: one line naming the server, exit 2.

tiled's client retries a refused connection with backoff (``stamina``, ~30 s); the tests make it
try once (``stamina.set_testing``), which changes how long, not what, the command reports."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def test_tiled_failing_while_frames_are_read_ends_the_analysis_run_fail(
        tmp_path: Path, trained_model_path: Path, tiled_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw frames stop coming part-way (an HTTP error from Tiled after the first frame): the
    command names it in one line, and the analysis run it began is stopped ``fail``, not left open."""
    import bluesky.plans as bp
    import httpx
    import numpy as np
    from bluesky import RunEngine
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter
    from tiled.client import from_uri

    from nanoseg_daemon import reanalyse as module
    from nanoseg_daemon import tiled_runs
    from nanoseg_daemon.config import load_daemon_config
    from nanoseg_daemon.tiled_sink import analysis_runs
    from tests.daemon.ingest_fixtures import ImageCamera
    from tests.daemon.service_fixtures import DOSE, transmission_frame
    from tests.daemon.tiled_fixtures import API_KEY

    root = from_uri(tiled_url, api_key=API_KEY)
    raw_container = root.create_container("raw_cut")
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(TiledWriter(raw_container))
    cam = ImageCamera(name="cam", frames=np.stack([transmission_frame(11, i).counts for i in range(3)]))
    (uid,) = RE(bp.count([cam], num=3), pixel_size_nm=8.0, i0=DOSE)

    original = tiled_runs.raw_frames

    def cut(*args: Any, **kwargs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        for k, item in enumerate(original(*args, **kwargs)):
            if k == 1:
                raise httpx.ReadError("connection reset by peer")
            yield item

    monkeypatch.setattr("nanoseg_daemon.tiled_runs.raw_frames", cut)
    cfg = load_daemon_config(None, {"tiled.uri": tiled_url, "tiled.raw_path": "[raw_cut]",
                                    "tiled.path": "[analysis_cut]", "tiled.api_key": API_KEY,
                                    "model.path": str(trained_model_path), "model.engine": "torch",
                                    "model.threads": "1", "store.state_dir": str(tmp_path)})
    with pytest.raises(module.ReanalysisError, match=r"failed while reading run .* ended `fail`; reanalyse again"):
        module.reanalyse(cfg, uid)
    (key,) = analysis_runs(root["analysis_cut"], uid)
    assert root["analysis_cut"][key].metadata["stop"]["exit_status"] == "fail"
