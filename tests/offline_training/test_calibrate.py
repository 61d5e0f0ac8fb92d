"""nanoseg calibrate: the grid is measured as evaluate measures, the best point is stored and used."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from nanoseg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoseg.cli import main
from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg.postprocess import OperatingPoint, PostprocessConfig, resolve_postprocess
from nanoseg_training.calibrate import GridPoint, best_point, calibrate
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.evaluate import evaluate_model
from nanoseg_training.synthetic_config import SceneConfig


@pytest.fixture(scope="module")
def paper_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 512 x 512 images of the paper preset (seed 11)."""
    root = tmp_path_factory.mktemp("cal") / "val"
    scene = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    write_dataset(scene, root, 4, seed=11, workers=1, progress=False, write_od=False)
    return root


def test_resolve_postprocess_precedence() -> None:
    point = OperatingPoint(score_threshold=0.3, mask_threshold=0.4)
    assert resolve_postprocess(PostprocessConfig(), None) == PostprocessConfig()
    got = resolve_postprocess(PostprocessConfig(), point)
    assert (got.score_threshold, got.mask_threshold, got.min_area_px) == (0.3, 0.4, 20)
    explicit = PostprocessConfig.model_validate({"score_threshold": 0.7, "nested": {"enabled": False}})
    got = resolve_postprocess(explicit, point)
    assert (got.score_threshold, got.mask_threshold, got.nested.enabled) == (0.7, 0.4, False)
    assert resolve_postprocess(got, OperatingPoint(score_threshold=0.1, mask_threshold=0.6)) == got  # resolved = explicit
    rescored = OperatingPoint(score_threshold=0.4, mask_threshold=0.5, mask_rescoring=True)
    assert resolve_postprocess(PostprocessConfig(), rescored).mask_rescoring is True
    assert resolve_postprocess(PostprocessConfig(mask_rescoring=False), rescored).mask_rescoring is False


def test_best_point_by_objective_and_ties() -> None:
    pts = [GridPoint(0.3, 0.5, 0.90, 9, 1, 0, 1.0, -0.5), GridPoint(0.5, 0.5, 0.90, 9, 0, 1, 0.5, -0.5),
           GridPoint(0.7, 0.4, 0.80, 8, 1, 1, 0.2, 0.1)]
    assert best_point(pts, "foreground_accuracy") == pts[1]  # tie on accuracy -> lower count error
    assert best_point(pts, "count_mae") == pts[2]


def test_calibrate_writes_the_point_evaluate_then_uses_it(trained_model_path: Path, paper_set: Path,
                                                           tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    shutil.copy(trained_model_path, model)
    before = load_checkpoint(model)
    assert main(["calibrate", str(model), str(paper_set), "--out", str(tmp_path / "cal"), "--write", "--quiet"]) == 0
    with open(tmp_path / "cal" / "calibration.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 8
    best = max(rows, key=lambda r: float(r["foreground_accuracy"]))
    after = load_checkpoint(model)
    point = after.operating_point
    assert point is not None and point.chosen_on == "val (4 images)" and point.objective == "foreground_accuracy"
    assert point.value == round(float(best["foreground_accuracy"]), 4)
    assert after.stored_half == before.stored_half
    assert all((after.state_dict[k] == v).all() for k, v in before.state_dict.items())  # weights untouched
    assert "Foreground accuracy" in (tmp_path / "cal" / "calibration.md").read_text()

    # evaluate measures the stored point exactly as the grid did (one code path for both)
    m = evaluate_model(model, paper_set, tmp_path / "ev", plots=False, progress=False)
    op = m["run"]["operating_point"]
    assert (op["score_threshold"], op["mask_threshold"]) == (point.score_threshold, point.mask_threshold)
    at = next(r for r in rows if float(r["score_threshold"]) == point.score_threshold
              and float(r["mask_threshold"]) == point.mask_threshold)
    assert m["accuracy"]["foreground"] == pytest.approx(float(at["foreground_accuracy"]), abs=1e-12)
    assert m["count"]["mean_absolute"] == pytest.approx(float(at["count_mae"]), abs=1e-12)
    # an explicit setting still wins over the model's point
    m = evaluate_model(model, paper_set, tmp_path / "ev2", plots=False, progress=False,
                       post=PostprocessConfig(score_threshold=0.95))
    assert m["run"]["operating_point"]["score_threshold"] == 0.95
    assert m["run"]["operating_point"]["mask_threshold"] == point.mask_threshold


def test_calibrate_without_write_leaves_the_checkpoint_and_bad_meta_is_named(
        trained_model_path: Path, paper_set: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    model = tmp_path / "model.pt"
    shutil.copy(trained_model_path, model)
    digest = model.read_bytes()
    point = calibrate(model, paper_set, tmp_path / "cal", objective="count_mae", limit=2, progress=False)
    assert point.objective == "count_mae" and point.chosen_on == "val (2 images)"
    assert model.read_bytes() == digest
    out = tmp_path / "fixed"
    assert main(["calibrate", str(model), str(paper_set), "--out", str(out), "--limit", "1", "--quiet",
                 "--scores", "0.5", "--masks", "0.5,0.4"]) == 0  # score fixed, mask tuned
    with open(out / "calibration.csv") as f:
        assert [(r["score_threshold"], r["mask_threshold"]) for r in csv.DictReader(f)] == [("0.5", "0.4"), ("0.5", "0.5")]
    assert main(["calibrate", str(model), str(paper_set), "--out", str(out), "--masks", "0.4,1.5", "--quiet"]) == 2
    ckpt = load_checkpoint(model)
    save_checkpoint(replace(ckpt, meta={**ckpt.meta, "operating_point": {"score_threshold": 2.0}}), model, half=True)
    with pytest.raises(CheckpointError, match=r"operating.point"):
        _ = load_checkpoint(model).operating_point
    assert main(["calibrate", str(model), str(paper_set), "--out", str(tmp_path / "c2"), "--quiet"]) == 2


def test_a_rescored_operating_point_is_stored_and_evaluated_on_rescored_scores(
        trained_model_path: Path, paper_set: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    shutil.copy(trained_model_path, model)
    assert main(["calibrate", str(model), str(paper_set), "--out", str(tmp_path / "cal"), "--limit", "2", "--quiet",
                 "--scores", "0.3,0.45", "--masks", "0.5", "--mask-rescoring", "--write"]) == 0
    point = load_checkpoint(model).operating_point
    assert point is not None and point.mask_rescoring
    with open(tmp_path / "cal" / "calibration.csv") as f:
        row = next(r for r in csv.DictReader(f) if float(r["score_threshold"]) == point.score_threshold)
    m = evaluate_model(model, paper_set, tmp_path / "ev", limit=2, plots=False, progress=False)
    assert m["run"]["operating_point"]["mask_rescoring"] is True
    assert m["accuracy"]["foreground"] == pytest.approx(float(row["foreground_accuracy"]), abs=1e-12)
    plain = evaluate_model(model, paper_set, tmp_path / "ev2", limit=2, plots=False, progress=False,
                           post=PostprocessConfig(mask_rescoring=False))
    assert plain["run"]["operating_point"]["mask_rescoring"] is False
    # rescored scores are class scores x maskness (<= 1): never more instances above the same threshold
    assert m["count"]["pred_total"] <= evaluate_model(
        model, paper_set, tmp_path / "ev3", limit=2, plots=False, progress=False,
        post=PostprocessConfig(mask_rescoring=False, score_threshold=point.score_threshold))["count"]["pred_total"]
    assert "class score x maskness" in (tmp_path / "ev" / "report.md").read_text()
