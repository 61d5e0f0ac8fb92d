"""Preview montage: each image with every wire's mask outline in its own colour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoseg.cli import main
from nanoseg.masks import decode_rle
from nanoseg_training.preview import PALETTE, preview_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
    p = np.pad(mask, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def test_montage_draws_each_outline_over_the_image(dataset, tmp_path: Path) -> None:
    out = preview_dataset(dataset.root, tmp_path / "p" / "preview.png", max_images=6, columns=4)
    montage = np.asarray(Image.open(out))
    assert montage.shape == (2 * (96 + 4), 4 * (96 + 4), 3)  # 6 tiles in 2 rows of 4, 4 px gaps
    coco = json.loads((dataset.root / "annotations.json").read_text())
    for i, img in enumerate(coco["images"]):
        r, c = divmod(i, 4)
        tile = montage[r * 100: r * 100 + 96, c * 100: c * 100 + 96]
        gray = np.asarray(Image.open(dataset.root / img["file_name"]))
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        edges = [boundary(decode_rle(a["segmentation"])) for a in anns]
        outline = np.any(edges, axis=0)
        np.testing.assert_array_equal(tile[~outline], np.repeat(gray[~outline, None], 3, axis=1))
        last = edges[-1]  # drawn last, so nothing covers it
        assert (tile[last] == PALETTE[(len(anns) - 1) % len(PALETTE)]).all()
    assert (montage[96:100, :] == 32).all()  # the gap between rows


def test_cli_preview_writes_the_requested_grid(dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "two.png"
    assert main(["preview", str(dataset.root), "--out", str(out), "--max-images", "2", "--columns", "3"]) == 0
    assert np.asarray(Image.open(out)).shape == (100, 200, 3)  # 2 images: 2 columns, not 3
    assert str(out) in capsys.readouterr().out


def test_preview_of_an_empty_data_set_fails(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no images"):
        preview_dataset(tmp_path, tmp_path / "p.png")
