"""Small scenes and data sets shared by the generator tests (64-96 px fields, a few images)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nanoseg.config_io import parse_config
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.synthetic_config import SceneConfig


def make_small_config(**overrides: Any) -> SceneConfig:
    """A 64 x 64 x 60 domain with thin wires, all shapes, tilt and the non-prismatic extras on.

    ``overrides`` replace whole top-level sections (``wires=...``, ``rendering=...``).
    """
    data: dict[str, Any] = {
        "name": "small",
        "domain": {"width": 64, "depth": 64, "height": 60},
        "wires": {
            "count": {"low": 4, "high": 12},
            "length": {"low": 10, "high": 80},
            "width": {"low": 3, "high": 14},
            "thickness_ratio": {"low": 0.5, "high": 1.0},
            "tilt_max_deg": 10.0,
            "min_visible_area": 5,
        },
        "non_prismatic": {
            "taper": {"probability": 0.4},
            "bend": {"probability": 0.4},
            "roughness": {"probability": 0.4},
            "sintering": {"probability": 0.3},
        },
        "rendering": {"blur_sigma": 0.0},
    }
    data.update(overrides)
    return parse_config(data, SceneConfig)


def make_dataset_config(mode: str = "optical_density") -> SceneConfig:
    """96 x 96 images with noise and background on, so every random draw of rendering is exercised."""
    return make_small_config(
        domain={"width": 96, "depth": 96, "height": 60},
        wires={
            "count": {"low": 4, "high": 9},
            "length": {"low": 20, "high": 90},
            "width": {"low": 4, "high": 12},
            "tilt_max_deg": 5.0,
            "min_visible_area": 12,
        },
        rendering={
            "mode": mode,
            "blur_sigma": 1.0,
            "blur_sigma_jitter": 0.5,
            "noise": {"enabled": True},
            "background": {"enabled": True},
        },
    )


@dataclass(frozen=True)
class WrittenDataset:
    root: Path
    config: SceneConfig
    seed: int
    count: int


@pytest.fixture
def small_config() -> Callable[..., SceneConfig]:
    return make_small_config


@pytest.fixture
def dataset_config() -> Callable[..., SceneConfig]:
    return make_dataset_config


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> WrittenDataset:
    """A 6-image data set written by one process: the reference for the other tests."""
    written = WrittenDataset(tmp_path_factory.mktemp("dataset") / "serial", make_dataset_config(), 7, 6)
    write_dataset(written.config, written.root, written.count, written.seed, workers=1, progress=False)
    return written
