"""Promote a registry version to ``current`` (evaluation gate, atomic switch, daemon hot reload), or
roll back to the version that was current before.

``promote``: verify the candidate's checksums -> evaluate it on the validation set -> compare its
mask AP with the current version's on the same set (evaluated then if the manifest has none) ->
refuse if it is more than ``margin`` AP points lower, unless forced (logged as such) -> verify
again and switch ``current`` -> send ``reload_model`` (path + sha256) to each daemon's control
socket. A daemon verifies the sha256 itself before loading; one that cannot load keeps serving
its model and says so in its reply, which ends up in the result.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from nanoseg.control_client import control_request
from nanoseg_training.registry import (
    Evaluation,
    Manifest,
    Registry,
    RegistryError,
    file_sha256,
    utc_now,
)

log = logging.getLogger("nanoseg.registry")

DEFAULT_MARGIN_AP = 2.0


@dataclass(frozen=True)
class ValidationSet:
    """The fixed validation set: a COCO data set directory, its first ``limit`` images."""

    path: Path
    limit: int | None = 20
    engine: str = "torch"
    threads: int = 2

    def sha256(self) -> str:
        return file_sha256(self.path / "annotations.json")

    def check(self) -> None:
        """Refuse a ``--val`` that is not a COCO data set directory, before anything is written."""
        if not (self.path / "annotations.json").is_file():
            raise RegistryError(f"--val {self.path}: no annotations.json there (expected a COCO data set "
                                "directory, as nanoseg generate writes)")


@dataclass(frozen=True)
class Notified:
    address: str
    ok: bool
    detail: str  # the daemon's model version on success, its error otherwise


@dataclass(frozen=True)
class Switch:
    """What ``promote`` / ``rollback`` did; times in seconds."""

    action: str
    version: str
    previous: str | None
    candidate: Evaluation | None = None
    baseline: Evaluation | None = None
    forced: bool = False
    evaluate_seconds: float = 0.0
    switch_seconds: float = 0.0
    notify_seconds: float = 0.0
    notified: list[Notified] = field(default_factory=list)

    @property
    def all_notified(self) -> bool:
        return all(n.ok for n in self.notified)


def evaluate_version(reg: Registry, version: str, val: ValidationSet) -> Evaluation:
    """Evaluate ``version`` (checksums verified first) and record the result in its manifest."""
    from nanoseg_training.evaluate import evaluate_model

    man = reg.verify(version)
    val.check()
    out = Path(tempfile.mkdtemp(prefix=f"eval-{man.version}-", dir=_evaluations_dir(reg)))
    t0 = time.monotonic()
    try:
        m = evaluate_model(reg.path(man.version) / "model.pt", val.path, out, engine=val.engine, limit=val.limit,
                           plots=False, threads=val.threads, progress=False)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no report of an evaluation that did not finish
        raise
    ev = Evaluation(dataset=str(val.path.resolve()), dataset_sha256=val.sha256(), limit=val.limit,
                    engine=val.engine, mask_ap=m["segm"]["AP"], box_ap=m["bbox"]["AP"],
                    foreground_accuracy=float(m["accuracy"]["foreground"]), images=int(m["images"]),
                    seconds=round(time.monotonic() - t0, 3), evaluated_at=utc_now())
    reg.write_manifest(man.model_copy(update={"evaluations": [*man.evaluations, ev]}))
    return ev


def _evaluations_dir(reg: Registry) -> Path:
    d = reg.root / "evaluations"
    d.mkdir(parents=True, exist_ok=True)
    return d


def gate(candidate: Evaluation, baseline: Evaluation | None, margin: float) -> str | None:
    """Why ``candidate`` may not replace ``baseline`` (None: it may)."""
    if baseline is None:
        return None
    if candidate.mask_ap is None:
        return "the candidate has no mask AP on the validation set"
    if baseline.mask_ap is not None and candidate.mask_ap < baseline.mask_ap - margin:
        return (f"mask AP {candidate.mask_ap:.2f} is {baseline.mask_ap - candidate.mask_ap:.2f} points below the "
                f"current model's {baseline.mask_ap:.2f} (margin {margin:.2f})")
    return None


_ADDRESS_RE = re.compile(r"^(?:tcp|ws|wss)://(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})(?:/\S*)?$"
                         r"|^(?:ipc|inproc)://\S+$")


def check_addresses(addresses: list[str]) -> None:
    """Refuse daemon control addresses ZeroMQ cannot connect to, before anything is switched.

    Parameters
    ----------
    addresses : list of str
        ``tcp://host:port`` (port 1-65535; also ``ws``/``wss``), ``ipc://path`` or ``inproc://name``.

    Raises
    ------
    RegistryError
        Naming every malformed address (e.g. ``localhost:5580``, no ``tcp://``).
    """
    bad = []
    for addr in addresses:
        m = _ADDRESS_RE.match(addr)
        if m is None or (m.group(1) is not None and not 1 <= int(m.group(1)) <= 65535):
            bad.append(addr)
    if bad:
        raise RegistryError(f"--notify: malformed daemon address {', '.join(repr(a) for a in bad)} "
                            "(expected tcp://HOST:PORT, ipc://PATH or inproc://NAME); nothing was switched")


def notify(reg: Registry, man: Manifest, addresses: list[str], timeout_s: float) -> list[Notified]:
    """Ask each daemon to hot-reload ``man``'s checkpoint (it checks the sha256 before loading).

    A daemon that cannot be reached or replies with an error is recorded as not notified and the
    next one is asked all the same; nothing here raises for one daemon.
    """
    path = str((reg.path(man.version) / "model.pt").resolve())
    request = {"command": "reload_model", "path": path, "sha256": man.artifacts["model.pt"].sha256}
    out = []
    for addr in addresses:
        try:
            reply = control_request(addr, request, timeout_s=timeout_s)
        except (TimeoutError, OSError, ValueError, zmq.ZMQError) as err:  # ValueError: a reply not JSON
            out.append(Notified(addr, False, f"{type(err).__name__}: {err}"))
            log.error("notify %s: %s", addr, out[-1].detail)
            continue
        try:
            if reply.get("ok"):
                out.append(Notified(addr, True, str(reply["result"]["model"]["version"])))
            else:
                out.append(Notified(addr, False, str(reply.get("error"))))
        except (KeyError, TypeError):
            out.append(Notified(addr, False, f"malformed reply {str(reply)[:200]}"))
        log.log(logging.INFO if out[-1].ok else logging.ERROR, "notify %s: %s", addr, out[-1].detail)
    return out


def promote(reg: Registry, version: str, val: ValidationSet, margin: float = DEFAULT_MARGIN_AP,
            force: bool = False, daemons: list[str] | None = None, timeout_s: float = 300.0) -> Switch:
    """Evaluate, gate, switch ``current`` to ``version`` and notify ``daemons``; RegistryError on refusal.

    A current version that cannot be evaluated (missing, corrupt) refuses like a failed gate, so
    ``force`` can replace it (and so repair a registry whose ``current`` points at nothing).
    """
    check_addresses(daemons or [])
    val.check()
    version = reg.resolve(version)
    with reg.locked():
        previous = reg.current()
        if previous == version:
            raise RegistryError(f"{version} is already current")
        t0 = time.monotonic()
        candidate = evaluate_version(reg, version, val)
        baseline, unusable = None, None
        if previous is not None:
            try:
                baseline = reg.manifest(previous).evaluation_on(candidate) or evaluate_version(reg, previous, val)
            except RegistryError as err:  # current missing or corrupt: a gate refusal --force can override
                unusable = f"the current version {previous} cannot be evaluated to compare with ({err})"
        evaluate_s = time.monotonic() - t0
        reason = unusable or gate(candidate, baseline, margin)
        if reason and not force:
            reg.log("refused", version, previous=previous, reason=reason, mask_ap=candidate.mask_ap)
            raise RegistryError(f"promotion of {version} refused: {reason}; --force overrides")
        if reason:
            log.warning("promotion of %s forced: %s", version, reason)
        t1 = time.monotonic()
        man = reg.verify(version)  # again: the files must still be what was evaluated
        reg.point_current(version)
        reg.log("promote", version, previous=previous, forced=bool(reason), reason=reason,
                mask_ap=candidate.mask_ap, baseline_mask_ap=baseline.mask_ap if baseline else None,
                margin=margin)
        switch_s = time.monotonic() - t1
    t2 = time.monotonic()
    notified = notify(reg, man, daemons or [], timeout_s)
    return Switch("promote", version, previous, candidate, baseline, bool(reason), evaluate_s, switch_s,
                  time.monotonic() - t2, notified)


def rollback(reg: Registry, daemons: list[str] | None = None, timeout_s: float = 300.0) -> Switch:
    """Make the version that was current before the current one current again (no gate: it
    served before), after verifying its checksums; notify ``daemons``."""
    check_addresses(daemons or [])
    with reg.locked():
        stack = reg.promotion_stack()
        if len(stack) < 2:
            raise RegistryError("nothing to roll back to: fewer than two promotions in the history")
        current, target = stack[-1], stack[-2]
        t1 = time.monotonic()
        try:
            man = reg.verify(target)
        except RegistryError as err:
            raise RegistryError(f"rollback to {target} refused: {err}") from None
        reg.point_current(target)
        reg.log("rollback", target, previous=current)
        switch_s = time.monotonic() - t1
    t2 = time.monotonic()
    notified = notify(reg, man, daemons or [], timeout_s)
    return Switch("rollback", target, current, switch_seconds=switch_s, notify_seconds=time.monotonic() - t2,
                  notified=notified)


def summary(s: Switch) -> dict[str, Any]:
    """JSON-ready account of a switch."""
    return {"action": s.action, "version": s.version, "previous": s.previous, "forced": s.forced,
            "candidate_mask_ap": s.candidate.mask_ap if s.candidate else None,
            "baseline_mask_ap": s.baseline.mask_ap if s.baseline else None,
            "evaluate_seconds": round(s.evaluate_seconds, 3), "switch_seconds": round(s.switch_seconds, 4),
            "notify_seconds": round(s.notify_seconds, 3),
            "daemons": [{"address": n.address, "ok": n.ok, "detail": n.detail} for n in s.notified]}
