"""daemon/config.py: ``NANOSEG__SECTION__KEY`` environment overrides (read by pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoseg.config_io import ConfigError
from nanoseg_daemon.config import load_daemon_config


def test_file_then_environment_then_set(tmp_path: Path) -> None:
    config = tmp_path / "d.yaml"
    config.write_text("queue:\n  size: 3\nmodel:\n  engine: torch\n  threads: 4\n")
    env = {"NANOSEG__QUEUE__SIZE": "7", "NANOSEG__MODEL__ONNX_PATH": "null",
           "NANOSEG__INGEST__BLUESKY__ENABLED": "false", "HOME": "/nowhere"}
    cfg = load_daemon_config(config, {"model.threads": "1"}, environ=env)
    assert cfg.queue.size == 7  # the environment over the file
    assert cfg.model.engine == "torch" and cfg.model.threads == 1  # the file kept; --set over both
    assert cfg.model.onnx_path is None and cfg.ingest.bluesky.enabled is False  # YAML scalars
    assert load_daemon_config(config, {"queue.size": "9"}, environ=env).queue.size == 9
    rule = load_daemon_config(config, environ={"NANOSEG__STATISTICS__EDGE_RULE": "miles_lantuejoul"})
    assert rule.statistics.edge_rule == "miles_lantuejoul" and cfg.statistics.edge_rule == "include"


@pytest.mark.parametrize(("name", "value", "field"), [
    ("NANOSEG__QUEUE__SIZE", "ten", "queue.size"),
    ("NANOSEG__QUEUE__SIZ", "1", "queue.siz"),
    ("NANOSEG__QUEUES", "1", "queues"),
    ("NANOSEG__MODEL__ENGINE", "[torch", "model.engine"),
    ("NANOSEG__STATISTICS__EDGE_RULE", "clip", "statistics.edge_rule"),
    ("NANOSEG__INGEST__RAW", "x", "ingest"),  # a section given one value (was a SettingsError traceback)
])
def test_a_bad_variable_fails_naming_the_field(name: str, value: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_daemon_config(None, environ={name: value})
