"""Promotion and rollback against a running daemon: the control socket hot-reloads the promoted
model; a tampered artifact is refused and the daemon keeps serving what it served."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoseg.control_client import control_request
from nanoseg_training.promotion import ValidationSet, promote, rollback
from nanoseg_training.registry import Registry, RegistryError
from tests.daemon.service_fixtures import (
    DOSE,
    Client,
    raw_header,
    start_service,
    transmission_frame,
)
from tests.offline_training.registry_fixtures import renamed_checkpoint, tamper, validation_set


def serving(svc) -> str:  # type: ignore[no-untyped-def]
    reply = control_request(svc.control.address, {"command": "status"})
    assert reply["ok"]
    return str(reply["result"]["model"]["version"])


def test_promote_rollback_and_tampered_artifact_with_live_daemon(tmp_path: Path, trained_model_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(trained_model_path)
    v2 = reg.register(renamed_checkpoint(trained_model_path, tmp_path / "retrained.pt", "retrained"))
    v3 = reg.register(renamed_checkpoint(trained_model_path, tmp_path / "another.pt", "another"))
    val = ValidationSet(validation_set(tmp_path / "val"), limit=1, threads=1)
    sha = {m.version: m.artifacts["model.pt"].sha256 for m in (v1, v2, v3)}

    promote(reg, "v1", val)
    svc = start_service(tmp_path / "state", reg.path("current") / "model.pt", **{"model.threads": "1"})
    client = Client(svc)
    try:
        assert serving(svc).endswith(sha["v0001"][:12])
        addr = [svc.control.address]

        done = promote(reg, "v2", val, daemons=addr)
        assert done.all_notified and done.baseline is not None and done.candidate is not None
        assert abs(done.candidate.mask_ap - done.baseline.mask_ap) < 2.0  # type: ignore[operator]
        assert serving(svc) == f"retrained@{sha['v0002'][:12]}" == done.notified[0].detail

        tamper(reg.path("v3") / "model.pt", "flip")
        with pytest.raises(RegistryError, match=r"v0003/model.pt: sha256 .* does not match .* refusing"):
            promote(reg, "v3", val, daemons=addr)
        assert reg.current() == "v0002" and serving(svc).startswith("retrained@")
        # The daemon's own check: told to load the tampered file with the manifest's digest, it refuses.
        reply = control_request(svc.control.address, {"command": "reload_model", "sha256": sha["v0003"],
                                                      "path": str(reg.path("v3") / "model.pt")})
        assert not reply["ok"] and "still serving retrained@" in reply["error"] and "does not match" in reply["error"]
        frame = transmission_frame(11, 0)
        client.send([raw_header(0, frame.counts, pixel_size_nm=8.0, i0=DOSE), frame.counts.tobytes()])
        (summary,) = list(client.summaries(1))
        assert summary["model_version"].startswith("retrained@") and summary["count"] > 0

        back = rollback(reg, daemons=addr)
        assert (back.version, back.previous) == ("v0001", "v0002") and back.all_notified
        assert reg.current() == "v0001" and serving(svc).endswith(sha["v0001"][:12])
    finally:
        client.close()
        svc.stop()
