"""nanoseg evaluate / sweep: known numbers on ground truth, shifted and thinned copies; a tiny model."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import wasserstein_distance

from nanoseg.cli import main
from nanoseg.config_io import ConfigError, parse_config
from nanoseg.engines.factory import input_spec_of, load_engine
from nanoseg.instances import Instances, mask_boxes
from nanoseg.masks import encode_rle, mask_bbox
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.eval_report import pixel_map
from nanoseg_training.evaluate import (
    AP_KEYS,
    STAT_COLUMNS,
    circular_wasserstein,
    evaluate_predictions,
    gt_instances,
    load_coco,
    predict_dataset,
)
from nanoseg_training.mask_diagnostics import box_fill
from nanoseg_training.synthetic_config import SceneConfig
from nanoseg_training.train import train
from nanoseg_training.train_config import TrainConfig

torch.set_num_threads(1)

SIZE = 128
# x, y, w, h: all 40 px wide, far apart, so a shift along x by s px gives every one IoU (40-s)/(40+s).
RECTS = ((8, 6, 40, 14), (70, 8, 40, 30), (10, 50, 40, 22), (68, 70, 40, 50))


def rectangles_coco(n_images: int = 3) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i in range(1, n_images + 1):
        images.append({"id": i, "height": SIZE, "width": SIZE, "file_name": f"images/{i:06d}.png"})
        for x, y, w, h in RECTS:
            m = np.zeros((SIZE, SIZE), bool)
            m[y : y + h, x : x + w] = True
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "segmentation": encode_rle(m), "area": float(m.sum()), "bbox": list(mask_bbox(m))})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nanowire"}]}


def shifted(inst: Instances, dx: int) -> Instances:
    masks = np.roll(inst.masks, dx, axis=2)
    return Instances(mask_boxes(masks), inst.scores, masks)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scene = parse_config({
        "name": "tiny", "domain": {"width": SIZE, "depth": SIZE, "height": 60},
        "wires": {"count": {"low": 3, "high": 6}, "length": {"low": 20, "high": 90},
                  "width": {"low": 5, "high": 12}, "min_visible_area": 20},
        "rendering": {"blur_sigma": 1.0},
    }, SceneConfig)
    root = tmp_path_factory.mktemp("eval") / "data"
    write_dataset(scene, root, 4, seed=3, workers=1, progress=False, write_od=False)
    return root


def tiny_train_config(data: Path, **solver: Any) -> dict[str, Any]:
    return {
        "name": "tiny", "threads": 1, "workers": 0, "log_period": 1,
        "model": {"fpn_channels": 32, "box_head_dim": 64, "mask_head_layers": [32],
                  "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                  "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
                  "box_batch_size_per_image": 64, "detections_per_img": 30},
        "data": {"train": str(data), "generate": None, "crop_sizes": [SIZE], "crop_weights": [1]},
        "solver": {"batch_size": 2, "max_iter": 3, "warmup_iters": 1, "base_lr": 0.01, **solver},
        "input_spec": {"size": SIZE, "pixel_size_nm": 8.0},  # segment_gray pads images up to the model input, no tiling
    }


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = parse_config(tiny_train_config(tiny_dataset), TrainConfig)
    return train(cfg, tmp_path_factory.mktemp("eval") / "run", progress=False)


def test_ground_truth_against_itself_is_perfect(tiny_dataset: Path) -> None:
    coco = load_coco(tiny_dataset)
    truth = gt_instances(coco)
    m = evaluate_predictions(coco, list(truth.items())).metrics
    for kind in ("bbox", "segm"):
        assert m[kind]["AP"] == m[kind]["AP50"] == m[kind]["AP75"] == m[kind]["AR"] == 100.0
    assert m["accuracy"]["foreground"] == 1.0 and m["accuracy"]["fp"] == m["accuracy"]["fn"] == 0
    assert m["accuracy"]["tp"] == sum(int(t.masks.any(0).sum()) for t in truth.values())
    assert all(m["statistics"][c]["wasserstein"] == 0.0 for c in STAT_COLUMNS)
    assert m["count"]["mean_absolute"] == 0.0 and m["count"]["gt_total"] == len(coco["annotations"])


def test_shifted_wires_score_less(tiny_dataset: Path) -> None:
    coco = load_coco(tiny_dataset)
    m = evaluate_predictions(coco, [(i, shifted(t, 3)) for i, t in gt_instances(coco).items()]).metrics
    assert 0 < m["segm"]["AP"] < 100 and 0 < m["bbox"]["AP"] < 100
    assert 0 < m["accuracy"]["foreground"] < 1
    assert m["count"]["mean_absolute"] == 0.0


def test_shifted_rectangles_give_known_ap_and_accuracy() -> None:
    coco, s = rectangles_coco(), 4
    m = evaluate_predictions(coco, [(i, shifted(t, s)) for i, t in gt_instances(coco).items()]).metrics
    # IoU 36/44 = 0.818 for every instance: matched at IoU thresholds 0.50..0.80 (7 of 10).
    for kind in ("bbox", "segm"):
        assert m[kind]["AP"] == pytest.approx(70.0)
        assert m[kind]["AP50"] == m[kind]["AP75"] == 100.0
    # Union of disjoint rectangles: TP (w - s) h, FP = FN = s h each.
    expected = sum((w - s) * h for _, _, w, h in RECTS) / sum((w + s) * h for _, _, w, h in RECTS)
    assert m["accuracy"]["foreground"] == pytest.approx(expected)
    assert m["accuracy"]["fp"] == m["accuracy"]["fn"] == 3 * s * sum(h for *_, h in RECTS)
    # A translation changes no particle statistic.
    assert all(m["statistics"][c]["wasserstein"] == pytest.approx(0.0, abs=1e-9) for c in STAT_COLUMNS)


def test_diagnostics_of_shifted_rectangles() -> None:
    coco, s = rectangles_coco(), 4
    d = evaluate_predictions(coco, [(i, shifted(t, s)) for i, t in gt_instances(coco).items()]).metrics["diagnostics"]
    # Every shifted mask overlaps its own rectangle (IoU 36/44): with ground-truth masks AP is 100.
    assert d["oracle_mask_AP"] == d["oracle_mask_AP75"] == 100.0
    assert d["matched"] == d["ground_truth"] == 12
    assert d["mean_iou"] == pytest.approx(36 / 44)
    assert d["fraction_iou_at_least"] == {"0.75": 1.0, "0.85": 0.0, "0.90": 0.0, "0.95": 0.0}
    assert [b["n"] for b in d["by_box_fill"]] == [0, 0, 0, 0, 12]  # rectangles fill their boxes
    per100 = 100 * s / 40  # s px of every 40 px wide row, on each side
    assert d["error_px_per_100_true"] == pytest.approx({"fp_background": per100, "fp_other_wires": 0.0,
                                                        "fn_under_other_wires": 0.0, "fn_elsewhere": per100})


def test_diagnostics_tell_crossing_errors_from_edge_errors() -> None:
    size = 64
    a = np.zeros((size, size), bool)
    a[20:30, :] = True  # horizontal wire, 640 px
    b = np.zeros((size, size), bool)
    b[:, 30:40] = True  # vertical wire crossing it, 640 px
    pa = a.copy()
    pa[30:34, 30:40] = True  # spills 40 px onto the vertical wire
    pb = b.copy()
    pb[20:30, 30:40] = False  # loses the 100 px crossing
    pred = Instances(mask_boxes(np.stack([pa, pb])), np.array([0.9, 0.8], np.float32), np.stack([pa, pb]))
    coco = {"images": [{"id": 1, "height": size, "width": size, "file_name": "x.png"}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": encode_rle(m),
                             "area": float(m.sum()), "bbox": list(mask_bbox(m))} for k, m in enumerate((a, b))],
            "categories": [{"id": 1, "name": "nanowire"}]}
    d = evaluate_predictions(coco, [(1, pred)]).metrics["diagnostics"]
    assert d["mean_iou"] == pytest.approx((640 / 680 + 540 / 640) / 2)
    assert d["error_px_per_100_true"] == pytest.approx({"fp_background": 0.0, "fp_other_wires": 100 * 40 / 1280,
                                                        "fn_under_other_wires": 100 * 100 / 1280, "fn_elsewhere": 0.0})
    assert {b["fill"]: b["n"] for b in d["by_box_fill"]}["0.8-1.0"] == 2  # axis-aligned bars fill their boxes


def test_box_fill_of_a_diagonal_wire() -> None:
    m = np.zeros((40, 40), bool)
    for k in range(40):
        m[k, max(k - 1, 0): k + 2] = True  # a 3 px wide diagonal band
    assert box_fill(m, mask_boxes(m[None])[0]) == pytest.approx(m.sum() / 1600)
    assert box_fill(m, np.zeros(4, np.float32)) == 0.0


def test_dropping_half_the_instances_halves_recall() -> None:
    coco = rectangles_coco()
    truth = gt_instances(coco)
    m = evaluate_predictions(coco, [(i, t.select([0, 2])) for i, t in truth.items()]).metrics
    for kind in ("bbox", "segm"):
        # Precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points.
        assert m[kind]["AP"] == pytest.approx(100 * 51 / 101, abs=1e-3)
        assert m[kind]["AR"] == pytest.approx(50.0)
    kept = sum(RECTS[k][2] * RECTS[k][3] for k in (0, 2))
    assert m["accuracy"]["foreground"] == pytest.approx(kept / sum(w * h for *_, w, h in RECTS))
    assert m["accuracy"]["fp"] == 0
    assert m["count"] == {"mean_absolute": 2.0, "mean_signed": -2.0, "mean_relative": 0.5,
                          "pred_total": 6, "gt_total": 12}
    assert m["statistics"]["area_px"]["pred_n"] == 6
    # Only detection is wrong here: ground-truth masks cannot raise the AP.
    assert m["diagnostics"]["oracle_mask_AP"] == pytest.approx(m["segm"]["AP"])
    assert m["diagnostics"]["matched"] == 6 and m["diagnostics"]["ground_truth"] == 12


def test_circular_wasserstein() -> None:
    assert circular_wasserstein(np.array([1.0]), np.array([179.0]), 180.0) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    u, v = rng.uniform(50, 130, 40), rng.uniform(60, 120, 25)  # within half a period: no wrap
    assert circular_wasserstein(u, v, 180.0) == pytest.approx(wasserstein_distance(u, v))


def test_pixel_map_colours() -> None:
    gt = np.zeros((1, 2, 2), bool)
    gt[0, 0, :] = True
    pred = np.zeros((1, 2, 2), bool)
    pred[0, :, 0] = True
    rgb = pixel_map(pred, gt)
    assert rgb[0, 0].tolist() == [0, 0, 255]  # TP blue
    assert rgb[0, 1].tolist() == [255, 0, 0]  # FN red
    assert rgb[1, 0].tolist() == [0, 200, 0]  # FP green
    assert rgb[1, 1].tolist() == [0, 0, 0]


def test_predict_dataset(tiny_model: Path, tiny_dataset: Path) -> None:
    engine, ckpt = load_engine(tiny_model, "torch", threads=1)
    seg = Segmenter(engine, input_spec_of(ckpt), PostprocessConfig(score_threshold=0.05))
    preds = predict_dataset(seg, tiny_dataset, limit=3, progress=False)
    assert [i for i, _ in preds] == [1, 2, 3]
    assert all(p.image_shape == (SIZE, SIZE) and (p.scores >= 0.05).all() for _, p in preds)


def test_evaluate_cli_writes_report(tiny_model: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    rc = main(["evaluate", str(tiny_model), str(tiny_dataset), "--out", str(out), "--quiet",
               "--threads", "1", "--stats-score-threshold", "0.05", "--mask-threshold", "0.4"])
    assert rc == 0
    for name in ("report.md", "metrics.json", "per_image.csv", "figures/statistics.png",
                 "figures/example_000001.png"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    for kind in ("bbox", "segm"):
        assert set(AP_KEYS) <= set(m[kind])
        assert all(v is None or 0 <= v <= 100 for v in m[kind].values())
    assert 0 <= m["accuracy"]["foreground"] <= 1
    assert m["images"] == 4 and len(m["per_image"]) == 4
    assert m["count"]["gt_total"] == len(load_coco(tiny_dataset)["annotations"])
    assert set(m["statistics"]) == set(STAT_COLUMNS)
    assert m["run"]["operating_point"]["score_threshold"] == 0.05
    assert m["run"]["operating_point"]["mask_threshold"] == 0.4
    assert main(["evaluate", str(tiny_model), str(tiny_dataset), "--out", str(out), "--quiet",
                 "--mask-threshold", "1.5"]) == 2
    report = (out / "report.md").read_text()
    assert "| mask |" in report and "figures/statistics.png" in report
    d = m["diagnostics"]
    assert d["oracle_mask_AP"] is None or 0 <= d["oracle_mask_AP"] <= 100
    assert d["ground_truth"] == m["count"]["gt_total"] and 0 <= d["matched"] <= d["ground_truth"]
    assert "## Where mask AP is lost" in report


def test_evaluate_rejects_images_larger_than_the_model(tiny_model: Path, tmp_path: Path) -> None:
    coco = rectangles_coco(1)
    coco["images"][0].update(height=2 * SIZE, width=2 * SIZE)
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    assert main(["evaluate", str(tiny_model), str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def run_sweep_file(sweep: dict[str, Any], tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """``nanoseg sweep`` on ``sweep`` written as YAML: the output directory and results.csv rows."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))  # arms run in file order
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv") as f:
        return out, list(csv.DictReader(f))


def test_sweep_runs_a_grid_and_writes_one_table(tiny_dataset: Path, tmp_path: Path) -> None:
    sweep = {
        "name": "tiny-sweep",
        "base": tiny_train_config(tiny_dataset),
        "overrides": {"solver.max_iter": 2},
        "grid": {"solver.base_lr": [0.01, 0.02]},
        "validation": {"data": str(tiny_dataset), "limit": 2},
    }
    out, rows = run_sweep_file(sweep, tmp_path)
    assert [float(r["solver.base_lr"]) for r in rows] == [0.01, 0.02]
    assert all(0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["mask_AP"]) <= 100 for r in rows)
    assert all(r["oracle_mask_AP"] == "" or 0 <= float(r["oracle_mask_AP"]) <= 100 for r in rows)
    for r in rows:
        run = out / "runs" / r["run"]
        assert json.loads((run / "eval" / "metrics.json").read_text())["images"] == 2
        assert yaml.safe_load((run / "config.yaml").read_text())["solver"]["max_iter"] == 2
    assert (out / "results.md").read_text().count("\n") == 4  # header, rule, 2 runs


def test_sweep_errors_name_the_field(tiny_dataset: Path, tmp_path: Path) -> None:
    from nanoseg_training.sweep import SweepConfig, run_sweep

    sweep = parse_config({"name": "bad", "base": tiny_train_config(tiny_dataset),
                          "grid": {"solver.base_rate": [0.1]}, "validation": {"data": str(tiny_dataset)}},
                         SweepConfig)
    with pytest.raises(ConfigError, match=re.escape("solver.base_rate: unknown key")):
        run_sweep(sweep, tmp_path, progress=False)


def test_sweep_arms_are_judged_on_several_validation_sets(tiny_dataset: Path, tmp_path: Path) -> None:
    sweep = {
        "name": "tiny-ablation",
        "base": tiny_train_config(tiny_dataset),
        "overrides": {"solver.max_iter": 2},
        "arms": {"flips": {"augment.hflip": 0.5}, "noise": {"augment.noise_std": [0.0, 4.0]}},
        "validation": {"indomain": {"data": str(tiny_dataset), "limit": 2},
                       "shifted": {"data": str(tiny_dataset), "limit": 1}},
    }
    out, rows = run_sweep_file(sweep, tmp_path)
    assert [(r["run"], r["arm"]) for r in rows] == [("00-flips", "flips"), ("01-noise", "noise")]
    for r in rows:
        run = out / "runs" / r["run"]
        assert json.loads((run / "eval-indomain" / "metrics.json").read_text())["images"] == 2
        assert json.loads((run / "eval-shifted" / "metrics.json").read_text())["images"] == 1
        assert 0 <= float(r["shifted.mask_AP"]) <= 100 and 0 <= float(r["indomain.accuracy"]) <= 1
    cfgs = [yaml.safe_load((out / "runs" / r["run"] / "config.yaml").read_text()) for r in rows]
    assert cfgs[0]["augment"]["hflip"] == 0.5 and cfgs[1]["augment"]["noise_std"] == [0.0, 4.0]

    # extended by one arm: the finished runs are neither retrained nor re-evaluated
    evaluated = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval-*/metrics.json")}
    sweep["arms"]["blur"] = {"augment.blur_probability": 0.5, "augment.blur_sigma": [0.5, 1.0]}
    _, again = run_sweep_file(sweep, tmp_path)
    assert again[:2] == rows and again[2]["arm"] == "blur"
    assert all(p.stat().st_mtime_ns == t for p, t in evaluated.items())


def test_sweep_needs_runs_and_names_a_bad_arm(tiny_dataset: Path) -> None:
    from nanoseg_training.sweep import SweepConfig

    base = {"name": "x", "base": tiny_train_config(tiny_dataset), "validation": {"data": str(tiny_dataset)}}
    with pytest.raises(ConfigError, match="grid, arms, or both"):
        parse_config(base, SweepConfig)
    with pytest.raises(ConfigError, match="arm names"):
        parse_config({**base, "arms": {"no spaces": {}}}, SweepConfig)


def test_release_calibrates_then_evaluates_and_the_card_says_where(tiny_model: Path, tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "released"
    assert main(["models", "release", str(tiny_model.parent), "--out", str(out), "--test-set", str(tiny_dataset),
                 "--validation-set", str(tiny_dataset), "--scores", "0.05,0.2", "--masks", "0.4,0.5",
                 "--threads", "1", "--quiet"]) == 0
    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.mask_decoding import MaskDecoding

    point = load_checkpoint(out / "model.pt").operating_point
    assert point is not None and point.score_threshold in (0.05, 0.2) and point.mask_threshold in (0.4, 0.5)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["run"]["operating_point"]["mask_threshold"] == point.mask_threshold
    card = (out / "MODEL_CARD.md").read_text()
    assert f"model's operating point (score >= {point.score_threshold}, mask >= {point.mask_threshold})" in card
    assert (out / "calibration" / "calibration.md").exists()
    assert f"| synthetic `{tiny_dataset.name}` (`nanoseg generate tiny --count 4 --seed 3`) | 4 |" in card  # its info
    assert f"`nanoseg evaluate {out.as_posix()}/model.pt <test set>" in card
    assert "nanoseg generate tiny --count 4 --seed 3 --out data/test" in card  # how to reproduce
    assert str(tiny_dataset) not in card and str(tiny_model.parent) not in card  # no machine paths
    for section in ("## Model details", "## Training data", "## Evaluation", "## Limits and intended use",
                    "## How to reproduce"):
        assert section in card
    rescored = tmp_path / "rescored"
    assert main(["models", "release", str(tiny_model.parent), "--out", str(rescored), "--test-set", str(tiny_dataset),
                 "--validation-set", str(tiny_dataset), "--scores", "0.05", "--masks", "0.5", "--mask-rescoring",
                 "--mask-margin", "1", "--refine-boxes", "2", "--also-mask-tta", "2", "--threads", "1", "--quiet"]) == 0
    point = load_checkpoint(rescored / "model.pt").operating_point
    assert point is not None and point.mask_rescoring
    assert point.mask_decoding == MaskDecoding(margin_px=1.0, tta=1, refine_boxes=2)  # chosen with the point
    metrics = json.loads((rescored / "evaluation" / "metrics.json").read_text())
    assert metrics["run"]["operating_point"]["mask_rescoring"] is True
    assert metrics["run"]["mask_decoding"] == point.mask_decoding.model_dump()
    tta = json.loads((rescored / "evaluation_tta2" / "metrics.json").read_text())
    assert tta["run"]["mask_decoding"] == {"margin_px": 1.0, "tta": 2, "refine_boxes": 2}
    card = (rescored / "MODEL_CARD.md").read_text()
    assert ("operating point (class score x maskness >= 0.05, mask >= 0.5; boxes refined by 2 passes of the box head, "
            "masks predicted on boxes grown by 1 px)") in card
    assert f"| the same, `--mask-tta 2` | 4 | {tta['segm']['AP']:.1f} | {tta['segm']['AP75']:.1f} |" in card
    again = tmp_path / "from_checkpoint"  # a checkpoint (e.g. copied back from a GPU machine) releases too
    assert main(["models", "release", str(rescored / "model.pt"), "--out", str(again), "--test-set", str(tiny_dataset),
                 "--threads", "1", "--quiet"]) == 0
    assert load_checkpoint(again / "model.pt").operating_point == load_checkpoint(rescored / "model.pt").operating_point
    assert "released from `model.pt` at commit" in (again / "MODEL_CARD.md").read_text()


def test_bad_threshold_flags_are_named_not_raised(tiny_model: Path, tiny_dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "release", str(tiny_model.parent), "--out", str(tmp_path / "r"), "--test-set",
                 str(tiny_dataset), "--validation-set", str(tiny_dataset), "--masks", "0.4,1.5", "--quiet"]) == 2
    assert "thresholds must lie in (0, 1)" in capsys.readouterr().err
    image = next(tiny_dataset.glob("images/*.png"))
    assert main(["segment", str(image), "--model", str(tiny_model), "--out", str(tmp_path / "s"),
                 "--mask-threshold", "1.5", "--quiet"]) == 2
    assert "mask_threshold" in capsys.readouterr().err
