"""nanoseg models compare: one row of overlays per model, the outputs of each kept beside the grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nanoseg.cli import main
from nanoseg_training.compare_models import LABEL_WIDTH_PX, model_label


def test_compare_writes_one_row_per_model(trained_model_path: Path, paper_samples: list, tmp_path: Path) -> None:
    gray, masks = paper_samples[0]
    transmission = np.exp(-gray / 255.0 * 2.0)  # a transmission frame of the sample's optical density
    frame = tmp_path / "frame.npy"
    np.save(frame, (transmission * 60000).astype(np.uint16))
    tall = tmp_path / "tall.npy"
    np.save(tall, (transmission[:, :256] * 60000).astype(np.uint16))
    out = tmp_path / "cmp" / "grid.png"
    assert main(["models", "compare", str(frame), str(tall), "--model", str(trained_model_path), "--model",
                 str(trained_model_path), "--profile", "ptychography", "--pixel-size", "8", "--out", str(out),
                 "--tile-height", "100", "--threads", "1"]) == 0
    grid = np.asarray(Image.open(out))
    # two rows of 100 px, each a label, a square tile and a tile half as wide (4 px gaps, 4 px border)
    assert grid.shape == (2 * 104, LABEL_WIDTH_PX + 4 + 104 + 54 + 4, 3)
    label = model_label(trained_model_path)
    seg = tmp_path / "cmp" / f"grid_{label}"
    assert (seg / "frame_overlay.png").exists() and (seg / "results.json").exists()
    assert (tmp_path / "cmp" / f"grid_{label}_2" / "tall_overlay.png").exists()  # the second row's own outputs
    overlay = np.asarray(Image.open(seg / "frame_overlay.png"))
    assert (overlay[..., 0] != overlay[..., 1]).any()  # outlines drawn: the model found the sample's wires
    assert len(masks) > 0


def test_compare_names_the_image_a_model_could_not_read(trained_model_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["models", "compare", str(bad), "--model", str(trained_model_path), "--out",
                 str(tmp_path / "g.png")]) == 1


def test_model_label() -> None:
    assert model_label(Path("models/default/model.pt")) == "default"
    assert model_label(Path("/x/run/chosen.pt")) == "chosen"
