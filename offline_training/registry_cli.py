"""``nanoseg models list|register|show|promote|rollback|export-triton`` (``--registry DIR``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nanoseg.cli import lazy

DEFAULT_REGISTRY_HELP = "registry directory (default $NANOSEG_REGISTRY or <cache>/registry)"


def registry_of(args: argparse.Namespace, existing: bool = True) -> Any:
    """The registry of ``--registry``; unless ``existing`` is False (``register`` makes one),
    RegistryError (exit 2) where there is no registry directory, so a mistyped path is named
    rather than read as an empty registry (or made into one)."""
    from nanoseg_training.registry import Registry, RegistryError, default_registry

    reg = Registry(Path(args.registry) if args.registry else default_registry())
    if existing and (why := _missing_registry(reg)) is not None:
        raise RegistryError(why)
    return reg


def _refused(command: str, err: Exception) -> int:
    """One line on stderr, exit 2. An ``OSError`` names its file (a registry or ``--repo`` that
    cannot be written, a ``current`` that cannot be replaced)."""
    if isinstance(err, OSError) and err.filename is not None:
        target = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
        err = RuntimeError(f"{target}: {err.strerror or err}")
    print(f"nanoseg models {command}: refused: {err}", file=sys.stderr)
    return 2


def _not_notified(command: str, reg: Any, s: Any) -> int:
    """Exit status of a switch: 0, or 1 with one line saying the registry's state when a daemon
    did not reload (``current`` has been switched and logged all the same)."""
    failed = [n for n in s.notified if not n.ok]
    if not failed:
        return 0
    print(f"nanoseg models {command}: {s.version} is current now (switched and logged in "
          f"{reg.root / 'history.jsonl'}), but {len(failed)} of {len(s.notified)} daemons did not reload "
          "and keep serving their previous model: " + "; ".join(f"{n.address} ({n.detail})" for n in failed),
          file=sys.stderr)
    return 1


def _missing_registry(reg: Any) -> str | None:
    """Why ``reg.root`` is not a registry to read (None: it is one, perhaps still empty)."""
    if not reg.root.exists():
        return f"{reg.root}: no registry there (nanoseg models register CHECKPOINT --registry DIR makes one)"
    if not reg.root.is_dir():
        return f"{reg.root}: not a directory, so not a registry"
    return None


def cmd_list(args: argparse.Namespace) -> int:
    """``nanoseg models list``: one line per version; exit 2, one line naming the file, when a
    manifest is unreadable."""
    from nanoseg_training.registry import RegistryError

    reg = registry_of(args)
    rows = []
    try:
        cur = reg.current()
        for v in reg.versions():
            m = reg.manifest(v)
            ev = m.evaluations[-1] if m.evaluations else None
            ap = f"{ev.mask_ap:8.2f}" if ev and ev.mask_ap is not None else f"{'—':>8}"
            box = f"{ev.box_ap:7.2f}" if ev and ev.box_ap is not None else f"{'—':>7}"
            rows.append(f"{'*' if v == cur else ' ':2}{v:8} {m.created:21} {ap} {box}  {m.source}")
    except (RegistryError, OSError) as err:
        return _refused("list", err)
    print(f"{'':2}{'version':8} {'created':21} {'mask AP':>8} {'box AP':>7}  source")
    for row in rows:
        print(row)
    if cur is not None and cur not in reg.versions():
        print(f"nanoseg models list: {reg.dangling(cur)}", file=sys.stderr)
        return 1
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from nanoseg.checkpoint import CheckpointError
    from nanoseg_training.evaluate import EvaluationError
    from nanoseg_training.promotion import ValidationSet, evaluate_version
    from nanoseg_training.registry import RegistryError

    reg = registry_of(args, existing=False)
    val = ValidationSet(Path(args.val), args.limit, args.engine, args.threads) if args.val else None
    try:
        if val is not None:
            val.check()  # before registering: a bad --val registers nothing
        man = reg.register(args.checkpoint, args.plan)
    except (CheckpointError, RegistryError, OSError) as err:
        return _refused("register", err)
    rc = 0
    if val is not None:
        try:
            with reg.locked():  # one manifest writer at a time (a promotion evaluates too)
                ev = evaluate_version(reg, man.version, val)
            print(f"{man.version}: mask AP {ev.mask_ap} on {ev.images} validation images")
        except (RegistryError, EvaluationError, CheckpointError, OSError) as err:
            print(f"nanoseg models register: {man.version} is registered, but its evaluation on {val.path} "
                  f"failed: {err}", file=sys.stderr)
            rc = 1
    print(json.dumps({"version": man.version, "path": str(reg.path(man.version)),
                      "artifacts": {k: v.sha256 for k, v in man.artifacts.items()}}))
    return rc


def cmd_show(args: argparse.Namespace) -> int:
    from nanoseg_training.registry import RegistryError

    reg = registry_of(args)
    try:
        man = reg.manifest(args.version)
        print(man.model_dump_json(by_alias=True, indent=2))
        reg.verify(man.version)
    except (RegistryError, OSError) as err:
        return _refused("show", err)
    print(f"{man.version}: checksums ok{' (current)' if reg.current() == man.version else ''}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from nanoseg.checkpoint import CheckpointError
    from nanoseg_training.evaluate import EvaluationError
    from nanoseg_training.promotion import ValidationSet, promote, summary
    from nanoseg_training.registry import RegistryError

    reg = registry_of(args)
    val = ValidationSet(Path(args.val), args.limit, args.engine, args.threads)
    try:
        s = promote(reg, args.version, val, args.margin, args.force, args.notify or [], args.timeout)
    except (RegistryError, EvaluationError, CheckpointError, OSError) as err:
        return _refused("promote", err)
    if s.forced:
        print(f"nanoseg models promote: FORCED past the AP gate (logged in {reg.root / 'history.jsonl'})",
              file=sys.stderr)
    print(json.dumps(summary(s)))
    return _not_notified("promote", reg, s)


def cmd_rollback(args: argparse.Namespace) -> int:
    from nanoseg_training.promotion import rollback, summary
    from nanoseg_training.registry import RegistryError

    reg = registry_of(args)
    try:
        s = rollback(reg, args.notify or [], args.timeout)
    except (RegistryError, OSError) as err:
        return _refused("rollback", err)
    print(json.dumps(summary(s)))
    return _not_notified("rollback", reg, s)


def _gpu_ids(text: str | None) -> list[int]:
    """``--gpus 0,1,3`` -> [0, 1, 3]; RegistryError naming the flag otherwise."""
    if not text:
        return [0]
    from nanoseg_training.registry import RegistryError

    ids = [g.strip() for g in text.split(",")]
    if not all(g.isdigit() for g in ids):
        raise RegistryError(f"--gpus {text!r}: expected GPU ids separated by commas, e.g. 0,1")
    return [int(g) for g in ids]


def cmd_export_triton(args: argparse.Namespace) -> int:
    from nanoseg.checkpoint import CheckpointError
    from nanoseg_training.registry import RegistryError
    from nanoseg_training.triton_repo import export_triton

    reg = registry_of(args)
    try:
        gpus = _gpu_ids(args.gpus)
        for flag, value, least in (("--instances", args.instances, 1), ("--cpu-threads", args.cpu_threads, 1),
                                   ("--max-batch", args.max_batch, 1), ("--queue-delay-us", args.queue_delay_us, 0)):
            if value is not None and value < least:
                raise RegistryError(f"{flag} {value}: must be {least} or more")
        paths = export_triton(reg, args.version, Path(args.repo), args.name, gpus, args.instances, args.cpu,
                              args.cpu_threads, args.max_batch, args.queue_delay_us)
        man = reg.manifest(args.version)
    except (RegistryError, CheckpointError, OSError) as err:
        return _refused("export-triton", err)
    skipped = "model.plan" in man.artifacts and args.cpu
    print(json.dumps({"version": man.version, "configs": [str(p) for p in paths],
                      "tensorrt": "skipped (--cpu)" if skipped else ("written" if "model.plan" in man.artifacts
                                                                     else "no plan in this version")}))
    return 0


def add_parsers(models: Any) -> None:
    """Add the registry subcommands to ``nanoseg models``' subparsers."""
    p = models.add_parser("list", help="registry versions (* = current) with their latest mask AP")
    p.add_argument("--registry", help=DEFAULT_REGISTRY_HELP)
    p.set_defaults(handler=lazy("nanoseg_training.registry_cli:cmd_list"))

    p = models.add_parser("register", help="add a checkpoint as a new version (exports ONNX, writes the manifest)")
    p.add_argument("checkpoint", help="nanoseg checkpoint (.pt)")
    p.add_argument("--plan", help="a TensorRT plan built from this checkpoint (nanoseg export --format tensorrt)")
    p.add_argument("--registry", help=DEFAULT_REGISTRY_HELP)
    _evaluation_args(p, required=False)
    p.set_defaults(handler=lazy("nanoseg_training.registry_cli:cmd_register"))

    p = models.add_parser("show", help="a version's manifest, and whether its checksums hold")
    p.add_argument("version", help="v0003, 3 or current")
    p.add_argument("--registry", help=DEFAULT_REGISTRY_HELP)
    p.set_defaults(handler=lazy("nanoseg_training.registry_cli:cmd_show"))

    p = models.add_parser("promote", help="evaluate, gate on mask AP, make current, hot-reload daemons")
    p.add_argument("version")
    p.add_argument("--registry", help=DEFAULT_REGISTRY_HELP)
    _evaluation_args(p, required=True)
    p.add_argument("--margin", type=float, default=2.0, help="refuse if mask AP is more than this below current's")
    p.add_argument("--force", action="store_true", help="promote even if the AP gate refuses (logged)")
    _notify_args(p)
    p.set_defaults(handler=lazy("nanoseg_training.registry_cli:cmd_promote"))

    p = models.add_parser("rollback", help="make the previously current version current again")
    p.add_argument("--registry", help=DEFAULT_REGISTRY_HELP)
    _notify_args(p)
    p.set_defaults(handler=lazy("nanoseg_training.registry_cli:cmd_rollback"))

    p = models.add_parser("export-triton", help="write a Triton model repository for a version")
    p.add_argument("version", help="v0003, 3 or current")
    p.add_argument("--repo", required=True, help="Triton model repository directory")
    p.add_argument("--registry", help=DEFAULT_REGISTRY_HELP)
    p.add_argument("--name", default="nanoseg", help="Triton model name (TensorRT variant: NAME_trt)")
    p.add_argument("--gpus", default="0", help="GPU ids, one instance_group each (default 0)")
    p.add_argument("--instances", type=int, default=1, help="model instances per GPU (or on the CPU)")
    p.add_argument("--cpu", action="store_true", help="KIND_CPU instances instead (no TensorRT variant)")
    p.add_argument("--cpu-threads", type=int, default=2, help="--cpu: ONNX Runtime threads per instance")
    p.add_argument("--max-batch", type=int, metavar="K",
                   help="images per run of the onnxruntime model, the server's max_batch_size (default: the "
                        "registry graph's, 1; another K re-exports model.pt at K)")
    p.add_argument("--queue-delay-us", type=int, default=2000,
                   help="dynamic batching: how long the server waits to fill a batch, microseconds (default 2000)")
    p.set_defaults(handler=lazy("nanoseg_training.registry_cli:cmd_export_triton"))


def _evaluation_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--val", required=required, help="validation COCO data set directory (fixed across promotions)")
    p.add_argument("--limit", type=int, default=20, help="evaluate the first N validation images")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--threads", type=int, default=2)


def _notify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notify", action="append", metavar="ADDRESS",
                   help="a daemon's control socket to hot-reload, e.g. tcp://host:5580 (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each daemon's reload")
