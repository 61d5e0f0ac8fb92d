"""The simulator's subcommands of ``nanoseg``: ``simulate`` and ``demo``.

Only argument parsing lives here, so ``nanoseg --help`` never imports bluesky; the handlers are
imported when their subcommand runs.
"""

from __future__ import annotations

from typing import Any

from nanoseg.cli import lazy


def add_commands(sub: Any) -> None:
    """Add ``simulate`` and ``demo`` to the ``nanoseg`` subparsers (entry point
    ``nanoseg.commands: simulator``)."""
    p = sub.add_parser("simulate", help="simulated microscope: a RunEngine publishing synthetic transmission frames")
    p.add_argument("config", nargs="?", default="growth", help="configs/simulator name (growth, raster) or a YAML path")
    p.add_argument("--mode", choices=["raster", "growth"], help="override the config's mode")
    p.add_argument("--proxy", help="bluesky 0MQ proxy input address (default: the config's)")
    p.add_argument("--hdf5", metavar="DIR", help="write AD_HDF5 files to DIR, referenced by resource/datum")
    p.add_argument("--frames", type=int, help="frames of a plain growth run")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default="out/simulate", help="directory for truth.json and truth.csv")
    p.add_argument("--monitor", action="store_true",
                   help="growth: run monitor_growth with NanosegStats on the daemon's summaries")
    p.add_argument("--summary", help="the daemon's summary address (for --monitor)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config value, e.g. growth.interval_s=20")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_sim.run:cmd_simulate"))

    p = sub.add_parser("demo", help="the full loop: proxy, daemon, simulated growth run, live table, report")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--daemon-config", default="configs/daemon/demo.yaml", help="daemon YAML")
    p.add_argument("--simulator-config", default="growth", help="configs/simulator name or YAML path")
    p.add_argument("--model", help="model checkpoint (default: the daemon config's, models/default/model.pt)")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], help="override the daemon config's engine")
    p.add_argument("--max-frames", type=int, help="override monitor.max_frames")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the daemon")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a simulator config value")
    p.set_defaults(handler=lazy("nanoseg_sim.demo:cmd_demo"))
