"""Real-style frames: ``nanoseg evaluate --profile`` (any contrast, any size, per-contrast groups)
and ``nanoseg segment`` writing COCO results and label TIFFs, on a tiny COCO set of generated
scenes written the way a microscope would: a TEM-like transmission frame and an OD map, both at
half the model's scale (16 nm/px)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.transform import rescale

from nanoseg.cli import main
from nanoseg.masks import decode_rle, encode_rle, mask_bbox
from nanoseg_training.release_model import real_set_text

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def frames_dataset(paper_samples: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 images of 256 x 256 px: id 1 a transmission frame (dark wires, ``contrast: dark``), id 2
    an OD map (bright wires, ``contrast: bright``); masks resampled with the images."""
    root = tmp_path_factory.mktemp("frames")
    (root / "images").mkdir()
    images, anns = [], []
    for image_id, (gray, masks) in enumerate(paper_samples[:2], start=1):
        small = rescale(gray, 0.5, order=1, anti_aliasing=True, preserve_range=True)
        if image_id == 1:
            pixels = 230.0 * np.exp(-1.5 * small / 255.0)
            contrast = "dark"
        else:
            pixels, contrast = small, "bright"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"images/{image_id}.png", "height": 256, "width": 256,
                       "contrast": contrast})
        for m in masks:
            half = rescale(m.astype(np.float32), 0.5, order=1, anti_aliasing=True) >= 0.5
            if half.sum() >= 10:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "segmentation": encode_rle(half), "area": float(half.sum()),
                             "bbox": list(mask_bbox(half))})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nanowire"}]}))
    return root


def test_evaluate_prepares_real_frames_and_groups_by_contrast(trained_model_path: Path, frames_dataset: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "ev"
    assert main(["evaluate", str(trained_model_path), str(frames_dataset), "--out", str(out), "--profile", "em",
                 "--pixel-size", "auto", "--max-detections", "120", "--threads", "1", "--quiet", "--no-plots"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    groups = m["groups"]["contrast"]
    assert set(groups) == {"dark", "bright"} and groups["dark"]["images"] == groups["bright"]["images"] == 1
    # The shipped model scores ~87 mask AP on such scenes at its own scale; prepared from 16 nm
    # frames of either contrast it must still find them (the half-size masks cost some AP).
    assert m["segm"]["AP"] > 40
    assert all(g["segm"]["AP"] > 30 for g in groups.values())
    rows = {int(r["image_id"]): r for r in csv.DictReader((out / "per_image.csv").read_text().splitlines())}
    assert rows[1]["input_used"] == "transmission" and rows[2]["input_used"] == "optical_density"
    for r in rows.values():  # auto found the 2x the frames were shrunk by (8 nm model -> ~16 nm frames)
        assert 16.0 / 2 ** 0.5 < float(r["pixel_size_nm"]) < 16.0 * 2 ** 0.5  # within half an octave
        assert 0.5 < float(r["auto_confidence"]) <= 1.0
    assert m["run"]["max_detections"] == 120 and m["run"]["profile"]["name"] == "em"
    report = (out / "report.md").read_text()
    assert "| dark | 1 |" in report and "profile `em`" in report
    # The model card's real-data table: one row per pixel-size setting, a column per contrast.
    table = real_set_text("frames", "em", 120, [("auto", m)])
    assert "| pixel size | mask AP | mask AP50 | contrast bright | contrast dark | box AP |" in table
    assert f"| auto | {m['segm']['AP']:.1f} | {m['segm']['AP50']:.1f} | {groups['bright']['segm']['AP']:.1f} |" in table
    # Without a profile the 16 nm frames would be read as model-scale gray images: refused.
    assert main(["evaluate", str(trained_model_path), str(frames_dataset), "--out", str(tmp_path / "x"),
                 "--pixel-size", "8", "--quiet"]) == 2


def test_segment_writes_coco_results_and_label_images(trained_model_path: Path, frames_dataset: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seg"
    frames = [str(frames_dataset / "images" / f"{i}.png") for i in (1, 2)]
    # The TEM profile takes the transmission frame; the OD map's background (0) is no I0: the
    # frame is refused by name and the message says it does not look like a TEM frame.
    assert main(["segment", *frames, "--model", str(trained_model_path), "--profile", "tem", "--pixel-size", "16",
                 "--out", str(tmp_path / "tem"), "--threads", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2.png: non_positive_reference" in err
    assert "frame looks like optical_density" in err and "the profile expects transmission" in err
    assert (tmp_path / "tem" / "1_labels.tif").exists() and not (tmp_path / "tem" / "2_labels.tif").exists()
    assert main(["segment", *frames, "--model", str(trained_model_path), "--profile", "em", "--pixel-size", "16",
                 "--out", str(out), "--threads", "1", "--edge-rule", "exclude", "--quiet"]) == 0
    images = json.loads((out / "images.json").read_text())
    assert [(im["id"], im["file_name"], im["height"]) for im in images] == [(1, "1.png", 256), (2, "2.png", 256)]
    results = json.loads((out / "results.json").read_text())
    for image_id in (1, 2):
        labels = tifffile.imread(out / f"{image_id}_labels.tif")
        assert labels.dtype == np.uint16 and labels.shape == (256, 256)
        records = [r for r in results if r["image_id"] == image_id]
        n = len(list(csv.DictReader((out / f"{image_id}_particles.csv").read_text().splitlines())))
        assert len(records) == n and labels.max() == n
        for k, r in enumerate(records):
            mask = decode_rle(r["segmentation"])
            assert 0 < r["score"] <= 1 and mask.shape == (256, 256)
            assert mask[labels == k + 1].all()  # a label's pixels lie in its mask (overlaps go to the best score)
        summary = json.loads((out / f"{image_id}_summary.json").read_text())
        assert summary["preparation"]["pixel_size_nm"] == 16.0
        assert summary["edge_rule"] == "exclude" and summary["count"] == n  # --edge-rule reached the summary
        assert summary["counted"] == n - summary["touching_edge"]
    # ``input: auto`` took each frame as what it is, and found wires on both.
    s1 = json.loads((out / "1_summary.json").read_text())["preparation"]
    s2 = json.loads((out / "2_summary.json").read_text())["preparation"]
    assert (s1["input_used"], s2["input_used"]) == ("transmission", "optical_density")
    assert all(len([r for r in results if r["image_id"] == i]) >= 3 for i in (1, 2))
