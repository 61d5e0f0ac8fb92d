"""Bad checkpoint files are refused with a CheckpointError naming the file and the field, at once.

Real files: the shipped model, re-saved with one part malformed, and a FIFO in its place.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoseg.checkpoint import CheckpointError, file_sha256, load_checkpoint
from nanoseg.cli import main
from nanoseg.config_io import ConfigError


@pytest.fixture(scope="module")
def base(trained_model_path: Path) -> dict[str, Any]:
    """The trained model as the plain dict a checkpoint file holds."""
    return load_checkpoint(trained_model_path).to_dict()


def _returns_within(fn: Any, path: Path, seconds: float = 10.0) -> BaseException | None:
    """Call ``fn(path)`` in a thread; the exception it raised (None if none), or fail if it blocks."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fn(path)
            result.append(None)
        except BaseException as err:
            result.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # unblock the reader (a writer that closes at once: end of file), then fail
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail(f"{fn.__name__}({path}) blocked on a FIFO")
    return result[0]


@pytest.mark.parametrize("fn", [load_checkpoint, file_sha256], ids=["load_checkpoint", "file_sha256"])
def test_fifo_is_refused_at_once(tmp_path: Path, fn: Any) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    err = _returns_within(fn, fifo)
    assert isinstance(err, CheckpointError) and str(fifo) in str(err) and "FIFO" in str(err)


def test_directory_is_refused_naming_it(tmp_path: Path) -> None:
    d = tmp_path / "adir.pt"
    d.mkdir()
    with pytest.raises(CheckpointError, match=r"adir\.pt: a directory, not a regular file"):
        load_checkpoint(d)


@pytest.mark.parametrize(("part", "value", "field"), [
    ("state_dict", {"a": 1}, r"state_dict\['a'\] is of type int, not a tensor"),
    ("state_dict", [1, 2], "state_dict is of type list"),
    ("input_spec", [1, 2], "input_spec is of type list, not a mapping"),
    ("input_spec", "size", "input_spec is of type str"),
    ("input_spec_size", "big", "input_spec: size: "),
    ("meta", "notadict", "meta is of type str, not a mapping"),
    ("meta", {"operating_point": {"score_threshold": 2}}, "meta.operating_point: score_threshold"),
    ("model_config", {"backbone": 3}, "model_config: "),
])
def test_malformed_contents_name_file_and_field(tmp_path: Path, base: dict[str, Any], part: str, value: Any,
                                                field: str) -> None:
    obj = dict(base)
    if part == "input_spec_size":
        obj["input_spec"] = {**base["input_spec"], "size": value}
    else:
        obj[part] = value
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=field) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: malformed checkpoint") and "\n" not in msg


def test_missing_fields_are_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"format": "nanoseg-checkpoint/1"}, path)
    with pytest.raises(CheckpointError, match="missing model_config, input_spec, state_dict"):
        load_checkpoint(path)


def test_checkpoint_error_is_a_config_error() -> None:
    """So ``nanoseg``'s main reports any one that reaches it in one line, exit 2."""
    assert issubclass(CheckpointError, ConfigError) and issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("part", ["state_dict", "input_spec"])
def test_models_register_malformed_exits_2_with_one_line(tmp_path: Path, base: dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str], part: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save({**base, part: {"a": 1} if part == "state_dict" else [1, 2]}, path)
    rc = main(["models", "register", str(path), "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(path) in err and part in err
    assert not (tmp_path / "reg" / "versions").exists() or not any((tmp_path / "reg" / "versions").iterdir())
