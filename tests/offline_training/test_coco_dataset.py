"""The COCO data set: labels match the scene, pycocotools reads it, output is reproducible."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from nanoseg.cli import main
from nanoseg.masks import decode_rle
from nanoseg_training.coco_dataset import make_sample, write_dataset
from nanoseg_training.scene import generate_scene

# pycocotools' RLE code under numpy 2 (the __array__ copy keyword): harmless, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def load(dataset: Path) -> dict:
    return json.loads((dataset / "annotations.json").read_text())


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def by_image(coco: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for a in coco["annotations"]:
        out[a["image_id"]].append(a)
    return out


def test_annotations_are_the_scene_wires(dataset) -> None:
    """Each RLE decodes to its wire's footprint; area, bbox and ground truth fields match;
    the image shows exactly the annotated wires (no unlabeled material, no empty label)."""
    coco = load(dataset.root)
    cfg = dataset.config
    anns = by_image(coco)
    assert [img["id"] for img in coco["images"]] == list(range(1, dataset.count + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    overlapping_pixels = 0
    for index, img in enumerate(coco["images"]):
        sample = make_sample(cfg, dataset.seed, index)
        scene = sample.scene
        assert (img["height"], img["width"]) == scene.shape == (96, 96)
        png = np.asarray(Image.open(dataset.root / img["file_name"]))
        np.testing.assert_array_equal(png, sample.image.gray)
        np.testing.assert_array_equal(np.load(dataset.root / img["od_file"]), sample.image.od)
        image_anns = anns[img["id"]]
        assert len(image_anns) == len(scene.wires) > 0
        masks = np.stack([decode_rle(a["segmentation"]) for a in image_anns])
        for a, w, m in zip(image_anns, scene.wires, masks):
            np.testing.assert_array_equal(m, w.full_mask(scene.shape))
            assert a["area"] == m.sum() >= cfg.wires.min_visible_area
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["length"] == pytest.approx(w.geometry.length, abs=1e-4)
            assert a["orientation"] == pytest.approx(w.geometry.angle_deg, abs=1e-4)
            assert a["cross_section"] == w.geometry.cross_section
            assert a["truncated"] == bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        # The union of the masks is exactly where there is material.
        np.testing.assert_array_equal(masks.any(axis=0), scene.thickness > 0)
        # Per pixel, the thickness is the sum over the annotated wires covering it.
        per_wire = np.zeros(scene.shape, np.int64)
        for w in scene.wires:
            y0, y1, x0, x1 = w.box
            per_wire[y0:y1, x0:x1] += w.counts
        np.testing.assert_array_equal(per_wire, scene.thickness)
        # Overlapping wires have overlapping masks, and the overlap is thicker than either wire.
        stacked = masks.sum(axis=0) >= 2
        overlapping_pixels += int(stacked.sum())
        for w in scene.wires:
            mine = w.full_mask(scene.shape) & stacked
            y0, y1, x0, x1 = w.box
            own = np.zeros(scene.shape, np.int64)
            own[y0:y1, x0:x1] = w.counts
            assert (scene.thickness[mine] > own[mine]).all()
    assert overlapping_pixels > 100  # the data set really has overlaps


def test_wires_dropped_during_drawing_are_counted(dataset) -> None:
    coco = load(dataset.root)
    for index, img in enumerate(coco["images"]):
        scene = generate_scene(dataset.config, np.random.default_rng(np.random.SeedSequence([dataset.seed, index])))
        assert img["wires_dropped"] == scene.dropped


def test_pycocotools_round_trip(dataset) -> None:
    with redirect_stdout(io.StringIO()):
        gt = COCO(str(dataset.root / "annotations.json"))
    assert gt.loadCats(gt.getCatIds()) == [{"id": 1, "name": "nanowire", "supercategory": "particle"}]
    assert len(gt.getImgIds()) == dataset.count
    for img_id in gt.getImgIds():
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=img_id)):
            np.testing.assert_array_equal(gt.annToMask(ann).astype(bool), decode_rle(ann["segmentation"]))
    results = copy.deepcopy(gt.loadAnns(gt.getAnnIds()))
    for r in results:
        r["score"] = 1.0
    for iou_type in ("segm", "bbox"):
        with redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)  # AP @ IoU 0.50:0.95
        assert ev.stats[1] == pytest.approx(1.0)  # AP50
        assert ev.stats[8] == pytest.approx(1.0)  # AR @ 100 detections


def test_same_seed_is_byte_identical_whatever_the_workers(dataset, tmp_path: Path) -> None:
    parallel = tmp_path / "parallel"
    write_dataset(dataset.config, parallel, dataset.count, dataset.seed, workers=2, progress=False)
    reference = file_hashes(dataset.root)
    assert len(reference) == 2 * dataset.count + 2  # PNG + OD per image, annotations, scene.yaml
    assert file_hashes(parallel) == reference


def test_another_seed_gives_other_images(dataset, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_dataset(dataset.config, other, dataset.count, dataset.seed + 1, workers=1, progress=False)
    a, b = file_hashes(dataset.root), file_hashes(other)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert sorted(differ) == sorted(k for k in a if k != "scene.yaml")


def test_scene_yaml_records_the_config(dataset) -> None:
    data = yaml.safe_load((dataset.root / "scene.yaml").read_text())
    assert data == dataset.config.model_dump(mode="json")
    info = load(dataset.root)["info"]
    assert (info["seed"], info["count"]) == (dataset.seed, dataset.count)


def test_without_od_the_images_and_labels_are_unchanged(dataset, tmp_path: Path) -> None:
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(dataset.config.model_dump(mode="json")))
    out = tmp_path / "no_od"
    rc = main(["generate", str(config), "--out", str(out), "--count", str(dataset.count),
               "--seed", str(dataset.seed), "--workers", "1", "--quiet", "--no-od"])
    assert rc == 0
    assert not (out / "od").exists()
    with_od, without = load(dataset.root), load(out)
    assert all("od_file" not in img for img in without["images"])
    for img in with_od["images"]:
        del img["od_file"]
    assert without == with_od
    ref = file_hashes(dataset.root)
    same = {k: v for k, v in ref.items() if k.startswith("images/") or k == "scene.yaml"}
    assert file_hashes(out) == {**same, "annotations.json": file_hashes(out)["annotations.json"]}


def test_cli_rejects_a_bad_config_naming_the_field(dataset, tmp_path: Path) -> None:
    data = dataset.config.model_dump(mode="json")
    data["wires"]["width"] = {"low": 12, "high": 4}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "nanoseg.cli", "generate", str(config), "--out", str(out), "--count", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"{config}: wires.width.high: must be >= low (12.0)" in proc.stderr
    assert not out.exists()


def test_cli_unknown_preset_lists_the_known_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "nosuchpreset", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "nosuchpreset" in err and "paper" in err and "sem" in err


def test_sem_mode_drops_hidden_wires_from_labels(small_config, tmp_path: Path) -> None:
    """SEM images see surfaces: a wire whose visible (topmost) area is below min_visible_area
    is dropped from the labels and from the image; the same scene in OD mode keeps it."""
    dense = {
        "count": {"low": 10, "high": 20}, "length": {"low": 20, "high": 70},
        "width": {"low": 4, "high": 12}, "min_visible_area": 30,
    }
    sem_cfg = small_config(wires=dense, rendering={"mode": "sem"})
    od_cfg = small_config(wires=dense, rendering={"mode": "optical_density"})
    min_visible = sem_cfg.wires.min_visible_area
    hidden_total = 0
    for index in range(12):
        sem = make_sample(sem_cfg, 3, index).scene
        od = make_sample(od_cfg, 3, index).scene  # same scene: rendering draws come after
        visible = np.bincount(od.top_label.ravel(), minlength=len(od.wires) + 1)[1:]
        kept = [w for w, v in zip(od.wires, visible) if v >= min_visible]
        assert [w.geometry for w in sem.wires] == [w.geometry for w in kept]
        hidden_total += len(od.wires) - len(kept)
        assert sem.dropped == od.dropped + len(od.wires) - len(kept)
        sem_visible = np.bincount(sem.top_label.ravel(), minlength=len(sem.wires) + 1)[1:]
        assert (sem_visible >= min_visible).all()
        union = np.zeros(sem.shape, bool)
        for w in sem.wires:
            union |= w.full_mask(sem.shape)
        np.testing.assert_array_equal(union, sem.top > 0)
    assert hidden_total > 0  # the case really occurs
    out = tmp_path / "sem"
    write_dataset(sem_cfg, out, 3, 3, workers=1, progress=False)
    coco = load(out)
    for index, img in enumerate(coco["images"]):
        n = sum(a["image_id"] == img["id"] for a in coco["annotations"])
        assert n == len(make_sample(sem_cfg, 3, index).scene.wires)
