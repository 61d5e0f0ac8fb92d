"""nanoseg train on a tiny data set: loss decreases, resume is exact, bad data is named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseg.checkpoint import load_checkpoint
from nanoseg.config_io import ConfigError, parse_config
from nanoseg_training.train import lr_at, train
from nanoseg_training.train_config import MixSource, TrainConfig
from nanoseg_training.train_data import BadSampleError, BatchDataset, CocoSource
from tests.offline_training.conftest import WrittenDataset


def tiny_config(data: Path, max_iter: int, **solver: float) -> TrainConfig:
    return parse_config({
        "name": "tiny", "seed": 3, "threads": 1, "workers": 0, "checkpoint_period": 5, "log_period": 1,
        "model": {"backbone": "resnet18", "fpn_channels": 32, "box_head_dim": 64, "mask_head_layers": [32],
                  "anchor_sizes": [8, 16, 32, 64, 128], "box_batch_size_per_image": 32,
                  "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100},
        "data": {"train": str(data), "generate": None, "crop_sizes": [96], "crop_weights": [1.0]},
        "augment": {"rot90": 0.0, "hflip": 0.0, "vflip": 0.0, "brightness": [1.0, 1.0], "contrast": [1.0, 1.0]},
        "solver": {"batch_size": 2, "base_lr": 0.01, "warmup_iters": 2, "max_iter": max_iter, **solver},
        "input_spec": {"pixel_size_nm": 8.0, "size": 96},
    }, TrainConfig)


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_loss_decreases_and_final_checkpoint_rebuilds(dataset: WrittenDataset, tmp_path: Path) -> None:
    out = train(tiny_config(dataset.root, 40), tmp_path / "run", progress=False)
    assert out.name == "model_final.pt"
    curve = losses(tmp_path / "run")
    assert len(curve) == 40
    assert np.mean(curve[-8:]) < 0.7 * np.mean(curve[:4]), curve
    ckpt = load_checkpoint(out)
    assert ckpt.meta["iterations"] == 40 and ckpt.input_spec["size"] == 96
    model = ckpt.build()
    with torch.no_grad():
        model([torch.zeros(1, 96, 96)])  # rebuilds and runs from the checkpoint alone


def test_resume_continues_exactly(dataset: WrittenDataset, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(dataset.root, 10), straight, progress=False)
    split = tmp_path / "split"
    assert train(tiny_config(dataset.root, 10), split, progress=False, stop_after=5).name == "last.pt"
    with pytest.raises(FileExistsError):
        train(tiny_config(dataset.root, 10), split, progress=False)  # refuses to overwrite a run
    other = tiny_config(dataset.root, 10).model_copy(update={"seed": 4})
    with pytest.raises(ConfigError, match=r"another config: seed \(3 -> 4\)"):  # would learn something else
        train(other, split, resume=True, progress=False)
    train(tiny_config(dataset.root, 10), split, resume=True, progress=False)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "last.pt", weights_only=True)["model"]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    assert losses(split)[5:] == pytest.approx(losses(straight)[5:], rel=1e-3)


def test_lr_schedule_warmup_and_steps(dataset: WrittenDataset) -> None:
    cfg = tiny_config(dataset.root, 100)
    assert lr_at(cfg, 0) == pytest.approx(0.01 * 0.001)
    assert lr_at(cfg, 50) == pytest.approx(0.01)
    assert lr_at(cfg, 80) == pytest.approx(0.001)
    assert lr_at(cfg, 95) == pytest.approx(0.0001)


def test_bad_data_is_named_or_skipped_and_counted(dataset: WrittenDataset, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset.root, broken)
    coco = json.loads((broken / "annotations.json").read_text())
    (broken / coco["images"][0]["file_name"]).unlink()
    first = coco["images"][1]["id"]
    for a in coco["annotations"]:
        if a["image_id"] == first:
            a["segmentation"]["counts"] = "garbage!!"
    (broken / "annotations.json").write_text(json.dumps(coco))
    src = CocoSource(broken)
    with pytest.raises(BadSampleError, match=coco["images"][0]["file_name"]):
        src.load(0)
    with pytest.raises(BadSampleError, match="corrupt mask"):
        src.load(1)
    cfg = tiny_config(broken, 5)
    skipping = BatchDataset(src, cfg.data.model_copy(update={"on_bad_sample": "skip"}), cfg.augment, 4, 0)
    images, _targets, skipped = skipping[0]
    assert len(images) == 4 and skipped >= 0
    total = sum(skipping[i][2] for i in range(20))
    assert total > 0  # 2 of 6 images are bad: some of 80 draws hit them
    strict = BatchDataset(src, cfg.data, cfg.augment, 4, 0)
    with pytest.raises(BadSampleError):
        for i in range(20):
            strict[i]


def test_unknown_training_key_names_the_field(dataset: WrittenDataset) -> None:
    with pytest.raises(ConfigError, match=r"solver\.learning_rate: unknown key"):
        parse_config({"name": "x", "solver": {"learning_rate": 0.1}}, TrainConfig)
    with pytest.raises(ConfigError, match=r"data: crop_sizes and crop_weights"):
        parse_config({"name": "x", "data": {"crop_sizes": [64], "crop_weights": [1, 2]}}, TrainConfig)


def _nan_losses_at(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """Make the model's training loss NaN on the given forward calls (0-based)."""
    import nanoseg_training.train as train_mod

    real_build = train_mod.build_model

    def build(cfg):  # type: ignore[no-untyped-def]
        model = real_build(cfg)
        forward = model.forward
        calls = iter(range(10**6))

        def poisoned(images, targets=None):  # type: ignore[no-untyped-def]
            out = forward(images, targets)
            if next(calls) in bad_calls:
                out = {k: v * float("nan") for k, v in out.items()}
            return out

        model.forward = poisoned  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(train_mod, "build_model", build)


def test_nonfinite_loss_skips_the_step_then_stops_if_it_persists(
        dataset: WrittenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoseg_training.train import MAX_NONFINITE_STREAK

    _nan_losses_at(monkeypatch, {2, 3})
    out = train(tiny_config(dataset.root, 6), tmp_path / "ok", progress=False)
    weights = load_checkpoint(out).state_dict
    assert all(torch.isfinite(v.float()).all() for v in weights.values())  # NaN never reached the weights
    with open(tmp_path / "ok" / "metrics.csv") as f:
        assert int(list(csv.DictReader(f))[-1]["skipped"]) == 2

    monkeypatch.undo()
    _nan_losses_at(monkeypatch, set(range(1, 1 + MAX_NONFINITE_STREAK)))
    with pytest.raises(FloatingPointError, match="in a row"):
        train(tiny_config(dataset.root, 20), tmp_path / "bad", progress=False)


def test_init_from_a_checkpoint_and_freeze_the_backbone(dataset: WrittenDataset, tmp_path: Path) -> None:
    first = train(tiny_config(dataset.root, 3), tmp_path / "first", progress=False)
    cfg = tiny_config(dataset.root, 4).model_copy(update={"init_from": str(first), "freeze": ("backbone",)})
    second = train(cfg, tmp_path / "second", progress=False)
    a, b = load_checkpoint(first).state_dict, load_checkpoint(second).state_dict
    backbone = [k for k in a if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are frozen too
    assert all(torch.equal(a[k], b[k]) for k in backbone)
    head = [k for k in a if k.startswith("roi_heads.mask_head.")]
    assert head and any(not torch.equal(a[k], b[k]) for k in head)

    bad = cfg.model_copy(update={"freeze": ("backbone", "no_such_module")})
    with pytest.raises(ValueError, match="no_such_module"):
        train(bad, tmp_path / "bad", progress=False)


def test_a_run_from_init_from_carries_the_lineage_of_its_weights(dataset: WrittenDataset, tmp_path: Path) -> None:
    from nanoseg.checkpoint import file_sha256
    from nanoseg_training.release_model import lineage_text
    from nanoseg_training.train import lineage

    first = train(tiny_config(dataset.root, 3), tmp_path / "first", progress=False)
    meta = load_checkpoint(first).meta
    assert lineage(meta) == [
        {"name": "tiny", "iterations": 3, "batch_size": 2, "seed": 3, "data": None, "init_from": None,
         "train_seconds": meta["train_seconds"], "train_device": meta["train_device"]}]
    assert lineage_text(load_checkpoint(first).meta) == ""  # one run: nothing to add to the card
    second = train(tiny_config(dataset.root, 2).model_copy(update={"init_from": str(first)}), tmp_path / "second",
                   progress=False)
    third = train(tiny_config(dataset.root, 4).model_copy(update={"init_from": str(second)}), tmp_path / "third",
                  progress=False)
    runs = load_checkpoint(third).meta["lineage"]
    assert [r["iterations"] for r in runs] == [3, 2, 4]
    assert [r.get("sha256") for r in runs] == [file_sha256(first), file_sha256(second), None]
    assert runs[2]["init_from"] == str(second) and runs[0]["init_from"] is None
    card = lineage_text(load_checkpoint(third).meta)
    assert "3 runs" in card and "9 iterations, 18 images" in card
    assert f"`{file_sha256(first)[:12]}`" in card and "| 3 | `tiny` | run 2 | 4 | 8 | given |" in card
    alone = {**runs[1], "init_from": "imported.pt"}  # a lineage whose first run started from outside
    mixed = {**runs[2], "data": {"preset": "paper", "count": 9, "seed": 1},
             "mix": [{"preset": "ptychography", "count": 5, "seed": 2}]}
    table = lineage_text({"lineage": [alone, mixed]})
    from nanoseg_training.train import training_stage
    assert training_stage({"train_config": {"data": {"generate": mixed["data"], "mix": [
        {"train": "x", "generate": mixed["mix"][0], "weight": 1.0}]}}})["mix"] == mixed["mix"]
    assert "| 1 | `tiny` | `imported.pt` |" in table and "`paper` 9, seed 1 + `ptychography` 5, seed 2" in table


def test_a_mix_of_data_sets_is_drawn_by_weight(dataset: WrittenDataset, tmp_path: Path) -> None:
    import shutil

    from nanoseg_training.train_data import MixedSource

    other = tmp_path / "other"
    shutil.copytree(dataset.root, other)
    a, b = CocoSource(dataset.root), CocoSource(other)
    mixed = MixedSource([a, b], [1.0, 3.0])
    rng = np.random.default_rng(0)
    draws = [mixed.draw(rng) for _ in range(2000)]
    from_b = np.mean([d >= len(a) for d in draws])
    assert 0.71 < from_b < 0.79  # 3 / (1 + 3)
    i = len(a) + 1
    assert np.array_equal(mixed.load(i).image, b.load(1).image)

    cfg = tiny_config(dataset.root, 2)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "mix": (parse_config({"train": str(other), "generate": None, "weight": 3.0}, MixSource),)})})
    assert train(cfg, tmp_path / "run", progress=False).name == "model_final.pt"


def test_init_from_a_relative_path_is_found_in_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoseg.paths import REPO_ROOT
    from nanoseg_training.train import resolve_init

    monkeypatch.chdir(tmp_path)  # not the repository
    assert resolve_init("models/default/model.pt") == REPO_ROOT / "models/default/model.pt"
    (tmp_path / "mine.pt").write_bytes(b"")
    assert resolve_init("mine.pt") == Path("mine.pt")


def test_scale_jitter_resamples_image_and_masks_together() -> None:
    from nanoseg_training.train_config import AugmentConfig
    from nanoseg_training.train_data import Sample, draw_scale, rescale, to_target

    image = np.zeros((100, 100), np.float32)
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 20:30, 10:90] = True  # an 80 x 10 px wire
    masks[1, 60:62, 60:63] = True  # 6 px: gone at half scale with min_area 4
    image[masks.any(0)] = 200.0
    big = rescale(Sample(image, masks), 1.5, min_area=4)
    assert big.image.shape == (150, 150) and big.masks.shape == (2, 150, 150)
    np.testing.assert_allclose(to_target(big.masks)["boxes"][0].numpy(), [15, 30, 135, 45], atol=1)
    assert abs(big.masks[0].sum() - 1.5**2 * 800) < 0.05 * 1.5**2 * 800
    assert big.image[37, 75] > 190 and big.image[5, 5] == 0  # the wire's pixels moved with its mask
    small = rescale(Sample(image, masks), 0.5, min_area=4)
    assert small.image.shape == (50, 50) and len(small.masks) == 1
    assert rescale(Sample(image, masks), 1.0, min_area=4).masks is masks

    rng = np.random.default_rng(0)
    cfg = parse_config({"scale": [0.8, 1.25]}, AugmentConfig)
    draws = np.array([draw_scale(cfg, rng) for _ in range(2000)])
    assert draws.min() >= 0.8 and draws.max() <= 1.25 and abs(np.median(draws) - 1.0) < 0.03  # log-uniform
    assert draw_scale(AugmentConfig(), rng) == 1.0
    with pytest.raises(ConfigError, match="scale"):
        parse_config({"scale": [1.5, 1.2]}, AugmentConfig)


def test_training_with_scale_jitter_runs(dataset: WrittenDataset, tmp_path: Path) -> None:
    cfg = tiny_config(dataset.root, 3)
    cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"scale": (0.7, 1.4)})})
    batch_images, targets, _ = BatchDataset(CocoSource(dataset.root), cfg.data, cfg.augment, 4, 0)[0]
    assert any(im.shape[1:] != (96, 96) for im in batch_images)  # factors < 1 shrink the whole frame
    for im, t in zip(batch_images, targets):
        assert t["masks"].shape[1:] == im.shape[1:]
        assert (t["boxes"][:, 2:] <= torch.tensor([im.shape[2], im.shape[1]])).all()
    assert train(cfg, tmp_path / "run", progress=False).name == "model_final.pt"


def polygons_of(mask: np.ndarray) -> list[list[float]]:
    """A mask as COCO polygons [x0, y0, x1, y1, ...] px, as CVAT or labelme export them."""
    from skimage.measure import find_contours

    contours = find_contours(np.pad(mask, 1).astype(float), 0.5)
    return [[float(v) for yx in c[:, ::-1] - 1 for v in yx] for c in contours if len(c) >= 3]


def own_labelled_set(dataset: WrittenDataset, root: Path, factor: float = 1.5) -> Path:
    """The generated set as a user's export: 8-bit transmission PNGs (dark wires on a bright
    background) ``factor`` x larger than the model's scale, masks as polygons."""
    from PIL import Image
    from skimage.transform import rescale

    from nanoseg.masks import decode_rle

    coco = json.loads((dataset.root / "annotations.json").read_text())
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for im in coco["images"]:
        gray = np.asarray(Image.open(dataset.root / im["file_name"]).convert("L"), np.float64)
        big = rescale(gray, factor, order=1, preserve_range=True)
        frame = 240.0 * np.exp(-big / 255.0)
        name = f"images/own_{im['id']}.png"
        Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(root / name)
        images.append({"id": im["id"], "file_name": name, "height": big.shape[0], "width": big.shape[1]})
        for a in coco["annotations"]:
            if a["image_id"] == im["id"]:
                m = rescale(decode_rle(a["segmentation"]).astype(float), factor, order=1) > 0.5
                anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": 1, "iscrowd": 0,
                             "segmentation": polygons_of(m), "area": float(m.sum())})
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "nanowire"}]}))
    return root


def test_fine_tuning_on_a_users_own_coco_export(dataset: WrittenDataset, tmp_path: Path) -> None:
    """``data.mix`` with a profile: a user's COCO export (polygons, 1.5x the model's scale,
    transmission contrast) is prepared like frames and mixed with synthetic data by weight."""
    from nanoseg.config_io import load_yaml
    from nanoseg.frame_profile import FrameProfile
    from nanoseg.input_spec import InputSpec
    from nanoseg.paths import CONFIGS
    from nanoseg_training.train_data import FramePreparation

    own = own_labelled_set(dataset, tmp_path / "own")
    tem = load_yaml(CONFIGS / "profiles" / "tem.yaml", FrameProfile)
    prepared = CocoSource(own, FramePreparation(tem, InputSpec(pixel_size_nm=8.0, size=96), 8.0 / 1.5))
    plain = CocoSource(dataset.root)
    for i in range(len(plain)):
        s, ref = prepared.load(i), plain.load(i)
        assert s.image.shape == ref.image.shape == (96, 96) and len(s.masks) == len(ref.masks)
        # back at the model's scale and contrast: bright wires on a dark background (OD from the
        # background, so the generator's haze and its slow variation are gone, not the wires)
        fg = s.masks.any(axis=0)
        assert s.image[fg].mean() > s.image[~fg].mean() + 40 and np.median(s.image[~fg]) < 30
        inter = (s.masks & ref.masks).sum(axis=(1, 2))
        union = (s.masks | ref.masks).sum(axis=(1, 2))
        assert np.median(inter / np.maximum(union, 1)) > 0.75  # polygons and two resamplings of 3-14 px wires
    first = train(tiny_config(dataset.root, 2), tmp_path / "first", progress=False)
    cfg = tiny_config(dataset.root, 2)
    mix = parse_config({"train": str(own), "generate": None, "weight": 3.0, "profile": "tem",
                        "pixel_size_nm": 8.0 / 1.5}, MixSource)
    cfg = cfg.model_copy(update={"init_from": str(first), "data": cfg.data.model_copy(update={"mix": (mix,)})})
    assert train(cfg, tmp_path / "tuned", progress=False).name == "model_final.pt"
    with pytest.raises(ConfigError, match="pixel_size_nm needs a profile"):
        parse_config({"train": str(own), "pixel_size_nm": 5.0}, MixSource)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs" / "training").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_training_config_is_valid(path: Path) -> None:
    """A config a lent GPU is to run (``CONFIG=... scripts/gpu_train.sh``) must not fail there on
    a field: each file under configs/training loads as the config it is for."""
    from nanoseg.config_io import load_yaml
    from nanoseg_training.train_config import TrainConfig
    from nanoseg_training.train_refiner import RefinerTrainConfig

    kind = RefinerTrainConfig if path.stem.startswith("refiner") else TrainConfig
    cfg = load_yaml(path, kind)
    assert cfg.name
