"""``nanoseg serve --config FILE``: run the daemon until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from nanoseg.config_io import parse_sets
from nanoseg_daemon.config import check_files, load_daemon_config
from nanoseg_daemon.logs import log, setup_logging


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_daemon_config(args.config, parse_sets(args.set or []))
    check_files(cfg, str(args.config or "<defaults>"))
    setup_logging(cfg.log.level, cfg.log.json_lines)
    from nanoseg_daemon.service import Service

    if cfg.ingest.bluesky.serializer == "pickle":
        log("pickle_enabled", 30, detail="bluesky payloads will be unpickled: only on a trusted network")
    try:
        service = Service(cfg)
    except Exception as err:
        log("startup_failed", 40, error=f"{type(err).__name__}: {err}")
        print(f"nanoseg serve: cannot start: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log("signal", signum=signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    while not stop.wait(0.5):
        if not service.stages.alive():
            log("stages_died", 50)
            break
    ok = service.stop()
    return 0 if ok else 1
