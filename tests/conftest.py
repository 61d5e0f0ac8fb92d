"""Fixtures shared by all test directories: the trained model and a few synthetic frames."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything loads torch's OpenMP: workers sleep instead of spinning, so parallel test
# processes (and a training job) on 2 cores do not starve each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from nanoseg.paths import MODELS

SHIPPED_MODEL = MODELS / "default" / "model.pt"


@pytest.fixture(scope="session")
def trained_model_path() -> Path:
    """The shipped model (a real model trained by this project); NANOSEG_TEST_MODEL overrides."""
    path = Path(os.environ.get("NANOSEG_TEST_MODEL", SHIPPED_MODEL))
    if not path.exists():
        pytest.fail(f"trained model {path} is missing (models/default/model.pt is part of the repository)")
    return path


@pytest.fixture(scope="session")
def paper_samples() -> list:
    """Three 512 x 512 scenes of the paper preset (seed 7): gray image + ground-truth masks."""
    from nanoseg.config_io import load_yaml
    from nanoseg.paths import resolve_config
    from nanoseg_training.coco_dataset import make_sample
    from nanoseg_training.synthetic_config import SceneConfig

    cfg = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    out = []
    for i in range(3):
        s = make_sample(cfg, 7, i)
        masks = np.stack([w.full_mask(s.scene.shape) for w in s.scene.wires])
        out.append((s.image.gray.astype(np.float32), masks))
    return out
