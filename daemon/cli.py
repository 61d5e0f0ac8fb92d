"""The daemon's subcommands of ``nanoseg`` (entry point ``nanoseg.commands: daemon``): ``serve``,
``results`` and ``reanalyse``. Only argument parsing lives here; handlers are imported when they run."""

from __future__ import annotations

from typing import Any

from nanoseg.cli import lazy
from nanoseg_daemon.results_cli import add_parser as add_results


def add_commands(sub: Any) -> None:
    """Add ``serve``, ``results`` and ``reanalyse`` to the ``nanoseg`` subparsers."""
    p = sub.add_parser("serve", help="run the live segmentation daemon")
    p.add_argument("--config", help="daemon YAML (configs/daemon/*.yaml); defaults apply without one")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config value, e.g. model.engine=torch")
    p.set_defaults(handler=lazy("nanoseg_daemon.serve_cli:cmd_serve"))
    add_results(sub)
    p = sub.add_parser("reanalyse", help="analyse a finished raw run from Tiled again (e.g. with a newer model) "
                                         "into a new analysis run in Tiled; prints its uid")
    p.add_argument("run_uid", help="the raw run's start uid")
    p.add_argument("--tiled", metavar="URL", help="Tiled server (default: the config's tiled.uri); API key from "
                                                 "NANOSEG__TILED__API_KEY")
    p.add_argument("--model", help="checkpoint to analyse with (default: the config's model.path)")
    p.add_argument("--profile", help="frame profile for every frame (default: the run's nanoseg_profile, "
                                     "else the config's profile)")
    p.add_argument("--config", help="daemon YAML whose model, postprocess, ingest.bluesky and tiled sections apply")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config value, e.g. tiled.raw_path=[raw] or model.engine=torch")
    p.set_defaults(handler=lazy("nanoseg_daemon.reanalyse:cmd_reanalyse"))
