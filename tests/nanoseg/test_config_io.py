"""Config loading: YAML validated once, errors naming the file and the field."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from pydantic import Field, model_validator

from nanoseg.config_io import (
    MAX_CONFIG_BYTES,
    ConfigError,
    StrictModel,
    dump_yaml,
    load_yaml,
    parse_config,
    parse_yaml,
    read_yaml_mapping,
    yaml_mapping,
)


class Queue(StrictModel):
    size: int = Field(8, ge=1)
    policy: str = "block"

    @model_validator(mode="after")
    def _known(self) -> Queue:
        if self.policy not in ("block", "drop_oldest"):
            raise ValueError("must be one of block, drop_oldest")
        return self


class Daemon(StrictModel):
    name: str = "d"
    queue: Queue = Queue()


def message(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, Daemon, "daemon.yaml")
    return str(info.value)


def test_valid_yaml_and_empty_file() -> None:
    assert parse_yaml("queue: {size: 3}", Daemon).queue.size == 3
    assert parse_yaml("", Daemon) == Daemon()
    assert parse_config(None, Daemon) == Daemon()


def test_models_are_frozen() -> None:
    cfg = Daemon()
    with pytest.raises(Exception, match="frozen"):
        cfg.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("queue: {sise: 3}", "daemon.yaml: queue.sise: unknown key"),
        ("queue: {size: 0}", "daemon.yaml: queue.size: Input should be greater than or equal to 1"),
        ("queue: {size: many}", "daemon.yaml: queue.size: Input should be a valid integer"),
        ("queue: {policy: latest}", "daemon.yaml: queue: must be one of block, drop_oldest"),
        ("- 1\n- 2", "daemon.yaml: <root>: expected a mapping, got list"),
        ("queue: {size: [", "daemon.yaml: not valid YAML"),
    ],
)
def test_errors_name_file_and_field(text: str, expected: str) -> None:
    assert message(text).startswith(expected)


def test_validator_messages_lose_pydantics_prefix() -> None:
    assert "Value error" not in message("queue: {policy: latest}")


def test_load_yaml_reads_files_and_reports_missing_ones(tmp_path: Path) -> None:
    p = tmp_path / "d.yaml"
    p.write_text("name: x\nqueue: {policy: drop_oldest}\n")
    assert load_yaml(p, Daemon) == Daemon(name="x", queue=Queue(policy="drop_oldest"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read config"):
        load_yaml(tmp_path / "missing.yaml", Daemon)


def test_dump_round_trips() -> None:
    cfg = Daemon(name="y", queue=Queue(size=5))
    assert parse_yaml(dump_yaml(cfg), Daemon) == cfg
    assert dump_yaml(cfg).splitlines()[0] == "name: y"  # field order kept, not sorted


@pytest.mark.parametrize("text", ["queue: {size: 8}\nqueue: {size: 16}\n", "queue:\n  size: 8\n  size: 16\n"])
def test_a_key_given_twice_is_an_error_naming_it(text: str) -> None:
    """PyYAML keeps the last of two equal keys, so the first setting would be silently ignored."""
    assert "given twice" in message(text) and ("'queue'" in message(text) or "'size'" in message(text))


def test_anchors_and_merge_keys_still_load() -> None:
    """A merge key's keys may be overridden: not a key given twice."""
    assert yaml_mapping("a: &q {size: 3}\nb: {<<: *q, size: 4}\nc: *q\n") == {
        "a": {"size": 3}, "b": {"size": 4}, "c": {"size": 3}}


def test_a_config_that_is_no_regular_file_or_too_large_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO would block the reader until some writer came (a profile named by a frame: the
    daemon's prepare stage), /dev/zero would never end; neither is opened for reading."""
    fifo = tmp_path / "profile.yaml"
    os.mkfifo(fifo)
    done: list[str] = []

    def read(path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            read_yaml_mapping(path)
        done.append(str(info.value))

    for path in (fifo, Path("/dev/zero")):
        t = threading.Thread(target=read, args=(path,), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"reading {path} blocked"
    assert len(done) == 2 and all("not a regular file" in m for m in done)
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="bytes"):
        read_yaml_mapping(big)
