"""Checkpoint variants and a validation set for registry and promotion tests.

* ``renamed``: the trained model's weights under another name: different bytes (a new sha256),
  the same AP, so it passes the promotion gate.
* ``degraded``: the mask head zeroed (every mask probability 0.5): mask AP collapses while boxes
  stay, so the gate must refuse it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from nanoseg.checkpoint import load_checkpoint, save_checkpoint
from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.synthetic_config import SceneConfig


def renamed_checkpoint(src: Path, out: Path, name: str) -> Path:
    ckpt = load_checkpoint(src)
    return save_checkpoint(replace(ckpt, meta={**ckpt.meta, "name": name}), out, half=True)


def degraded_checkpoint(src: Path, out: Path) -> Path:
    ckpt = load_checkpoint(src)
    state = {k: torch.zeros_like(v) if "mask_predictor" in k else v for k, v in ckpt.state_dict.items()}
    return save_checkpoint(replace(ckpt, state_dict=state, meta={**ckpt.meta, "name": "degraded"}), out, half=True)


def validation_set(out: Path, count: int = 2, seed: int = 5) -> Path:
    """``count`` 512 x 512 paper-preset images (8 nm pixels, the model's scale) with ground truth."""
    write_dataset(load_yaml(resolve_config("paper", "synthetic"), SceneConfig), out, count, seed, 1, False,
                  write_od=False)
    return out


def tamper(path: Path, how: str) -> None:
    """``truncate`` the file to half, or ``flip`` one byte in the middle (same size)."""
    path.chmod(0o644)  # registry artifacts are read-only
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
