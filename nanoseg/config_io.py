"""One way to read configuration: YAML validated by a pydantic model, errors that name the field."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from nanoseg.paths import open_regular

M = TypeVar("M", bound=BaseModel)

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read, bytes (1 MiB): a config is a page of YAML."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping (the first would be ignored)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


class StrictModel(BaseModel):
    """Base for every config and message model: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A configuration could not be read or validated; the message names the file and field."""


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render pydantic errors as one ``source: a.b.c: message`` line each.

    Parameters
    ----------
    err : pydantic.ValidationError
    source : str
        Where the data came from (a file path or ``<config>``).

    Returns
    -------
    str
        The lines joined by newlines; unknown keys read ``unknown key``, our validators' messages
        appear in their own words.
    """
    lines = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our validators' own words, without "Value error, "
        lines.append(f"{source}: {_field_path(tuple(e['loc']))}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, model: type[M], source: str = "<config>") -> M:
    """Validate already-parsed data against a config model.

    Parameters
    ----------
    data : Any
        A mapping (``None`` counts as empty).
    model : type of pydantic.BaseModel
    source : str, optional
        Where the data came from, for the message.

    Returns
    -------
    model
        The validated instance.

    Raises
    ------
    ConfigError
        Naming each bad field (``source: a.b: message``).
    """
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def yaml_mapping(text: str, source: str = "<config>") -> dict[str, Any]:
    """Parse YAML text that must hold a mapping.

    Parameters
    ----------
    text : str
    source : str, optional
        Where the text came from, for the message.

    Returns
    -------
    dict
        The mapping; an empty document gives ``{}``.

    Raises
    ------
    ConfigError
        If the text is not YAML, gives a key twice in one mapping, or its root is not a mapping.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping, got {type(data).__name__}")
    return data or {}


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file holding a mapping.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        If the file cannot be read, is not a regular file (a FIFO or device would block or never
        end) or is over ``MAX_CONFIG_BYTES``, or holds no mapping; the message names the file.
    """
    p = Path(path)
    try:
        with open_regular(p) as f:  # a FIFO would wait for a writer, a device never end
            st = os.fstat(f.fileno())
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{p}: cannot read config: {st.st_size} bytes, over {MAX_CONFIG_BYTES}")
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: cannot read config: over {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: cannot read config: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return yaml_mapping(text, str(p))


def parse_yaml(text: str, model: type[M], source: str = "<config>") -> M:
    """:func:`yaml_mapping` then :func:`parse_config` (same parameters, result and errors).

    Returns
    -------
    model
        The validated instance.
    """
    return parse_config(yaml_mapping(text, source), model, source)


def load_yaml(path: str | Path, model: type[M]) -> M:
    """:func:`read_yaml_mapping` then :func:`parse_config`, errors naming the file.

    Parameters
    ----------
    path : str or Path
    model : type of pydantic.BaseModel

    Returns
    -------
    model
        The validated instance.
    """
    return parse_config(read_yaml_mapping(path), model, str(path))


def dump_yaml(model: BaseModel) -> str:
    """Serialise a config model to YAML (round-trips through :func:`parse_yaml`).

    Parameters
    ----------
    model : pydantic.BaseModel

    Returns
    -------
    str
        YAML text, keys in field order.
    """
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, str], source: str) -> dict[str, Any]:
    """Set dotted keys to YAML-parsed values in a copy of a nested dict.

    Parameters
    ----------
    data
        The config as read (nested dicts), not changed.
    overrides
        Dotted key -> value text, e.g. ``{"model.engine": "torch", "queue.size": "8"}``; each value
        is parsed as a YAML scalar (``null``, ``false``, ``8``).
    source
        Where the overrides come from, for error messages (e.g. ``"daemon.yaml (--set)"``).

    Returns
    -------
    dict
        The copy with the overrides set; validation is left to ``parse_config``.
    """
    out = copy.deepcopy(data)
    for dotted, raw in overrides.items():
        keys = [k for k in dotted.split(".") if k]
        if not keys:
            raise ConfigError(f"{source}: empty key in override {dotted!r}")
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{source}: {dotted}: {k} is not a section")
            node = nxt
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: {dotted}: value is not valid YAML: {err}") from None
    return out


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s values over it, nested mappings merged key by key.

    Parameters
    ----------
    base, top
        Nested config mappings; neither is changed.

    Returns
    -------
    dict
        A new mapping: ``top``'s value wins wherever both have a key that is not a mapping in both.
    """
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_sets(items: list[str]) -> dict[str, str]:
    """Split ``--set KEY=VALUE`` options.

    Parameters
    ----------
    items
        The options' values, e.g. ``["model.engine=torch"]``.

    Returns
    -------
    dict
        ``{KEY: VALUE}`` with VALUE as text (``apply_overrides`` parses it).
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. model.engine=torch)")
        out[key.strip()] = value
    return out
