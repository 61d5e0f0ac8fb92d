"""The daemon's subcommands of ``nanoseg`` (entry point ``nanoseg.commands: daemon``): ``serve``
and ``results``. Only argument parsing lives here; handlers are imported when they run."""

from __future__ import annotations

from typing import Any

from nanoseg.cli import lazy
from nanoseg_daemon.results_cli import add_parser as add_results


def add_commands(sub: Any) -> None:
    """Add ``serve`` and ``results`` to the ``nanoseg`` subparsers."""
    p = sub.add_parser("serve", help="run the live segmentation daemon")
    p.add_argument("--config", help="daemon YAML (configs/daemon/*.yaml); defaults apply without one")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config value, e.g. model.engine=torch")
    p.set_defaults(handler=lazy("nanoseg_daemon.serve_cli:cmd_serve"))
    add_results(sub)
