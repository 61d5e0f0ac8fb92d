"""A real ``tiled serve`` for the tests that write to or read from Tiled."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from nanoseg_sim.demo import free_ports

API_KEY = "secret0test0key"  # tiled takes alphanumeric keys only


@contextlib.contextmanager
def tiled_serve(log_dir: Path, readable: Path | None = None, port: int | None = None) -> Iterator[str]:
    """``tiled serve catalog --temp`` (a fresh, empty catalog) on a free loopback port or ``port``
    (its URL), stopped at the end; ``readable``: a directory whose files (a detector's HDF5) runs
    may reference. A second one on the same port is the same server restarted, its catalog lost."""
    port = port if port is not None else free_ports(1)[0]
    log = (log_dir / "serve.log").open("a")
    exe = Path(sys.executable).parent / "tiled"
    read = ["-r", str(readable)] if readable is not None else []
    proc = subprocess.Popen([str(exe), "serve", "catalog", "--temp", "--api-key", API_KEY, *read,
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/v1/", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tiled serve did not start (exit {proc.poll()}), see {log.name}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
