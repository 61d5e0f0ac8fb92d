"""The ``nanoseg`` command: one entry point, one subcommand per job.

The core names no subcommand. Each installed layer (trainer, daemon, simulator) declares a
function in the entry-point group ``nanoseg.commands`` (``pyproject.toml``) that adds its
subcommands to the parser; each subcommand's handler is ``lazy("module:function")``, imported
only when that subcommand runs, so ``nanoseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from nanoseg.config_io import ConfigError

Handler = Callable[[argparse.Namespace], int]
ENTRY_POINT_GROUP = "nanoseg.commands"


def lazy(target: str) -> Handler:
    """A subcommand handler imported only when it runs.

    Parameters
    ----------
    target
        ``"package.module:function"`` (the form of an entry point); the function takes the
        parsed arguments and returns the exit status.

    Returns
    -------
    Handler
        Set it as the parser's default ``handler`` (``p.set_defaults(handler=lazy(...))``).
    """
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"lazy handler {target!r}: expected 'package.module:function'")

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))

    run.__qualname__ = run.__name__ = f"lazy({target})"
    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``nanoseg`` parser with the subcommands of every installed layer."""
    parser = argparse.ArgumentParser(prog="nanoseg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        add_commands: Callable[[Any], None] = ep.load()
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``nanoseg`` subcommand; its exit status (2: a configuration or file error)."""
    # Before torch loads libgomp: sleeping (not spinning) OpenMP workers. On 2 shared cores,
    # spinning threads of one process starve another's; measured here, training under contention
    # went from 6-14 s to ~2.5 s per iteration. An explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"nanoseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
