"""nanoseg train-refiner on a few scenes with the shipped model: samples, training, the output model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import nanoseg_training.train_refiner as tr
from nanoseg.checkpoint import load_checkpoint, without_refiner
from nanoseg.cli import main
from nanoseg.config_io import load_yaml
from nanoseg.mask_refiner import upsampled
from nanoseg.paths import resolve_config
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.synthetic_config import SceneConfig
from nanoseg_training.train_data import CocoSource


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refine") / "paper-s5-n5"
    write_dataset(load_yaml(resolve_config("paper", "synthetic"), SceneConfig), root, 5, 5, workers=1, write_od=False)
    return root


def write_config(path: Path, data: Path, **over: object) -> Path:
    cfg = {"name": "tiny", "data": str(data), "generate": None, "holdout_images": 2, "epochs": 3,
           "batch_size": 16, "lr": 0.005, "threads": 2, "refiner": {"size": 28, "channels": 4, "dilations": [1, 2]}}
    path.write_text(yaml.safe_dump(cfg | over))
    return path


def test_samples_are_the_models_matched_detections(trained_model_path: Path, scenes: Path) -> None:
    ckpt = load_checkpoint(trained_model_path)
    s = tr.extract_samples(ckpt, CocoSource(scenes), range(2), 28)
    m = 2 * ckpt.model_config.mask_roi_size
    assert len(s) > 5 and s.crops.shape[1:] == s.targets.shape[1:] == (28, 28) and s.coarse.shape[1:] == (m, m)
    assert set(np.unique(s.image_index)) <= {0, 1}
    assert np.all(s.boxes[:, 2:] > s.boxes[:, :2])
    # The coarse masks already agree with their targets; an empty or shifted target would not.
    iou = tr.mean_iou(upsampled(torch.from_numpy(s.coarse).float(), 28)[1], torch.from_numpy(s.targets).float())
    assert iou > 0.75


def test_train_refiner_cli(trained_model_path: Path, scenes: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOSEG_CACHE", str(tmp_path / "cache"))
    cfg = write_config(tmp_path / "tiny.yaml", scenes)
    out = tmp_path / "refined.pt"
    assert main(["train-refiner", str(cfg), "--model", str(trained_model_path), "--out", str(out), "--quiet"]) == 0
    assert "held-out mask IoU" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt.model_config.mask_refiner is not None and ckpt.model_config.mask_refiner.size == 28
    info = ckpt.meta["mask_refiner"]
    assert [r["epoch"] for r in info["history"]] == [0, 1, 2, 3]
    # Epoch 0 is the mask head's own masks; training lowers the loss on the training samples.
    assert info["history"][3]["train_loss"] < info["history"][0]["train_loss"]
    assert info["samples"] > 0 and info["holdout_samples"] > 0 and 0 < info["holdout_iou"] <= 1
    # The detector, its decoding and operating point are the base model's.
    base = load_checkpoint(trained_model_path)
    assert ckpt.meta["operating_point"] == base.meta["operating_point"]
    for k, v in without_refiner(base).state_dict.items():
        torch.testing.assert_close(ckpt.state_dict[k], v)
    # The samples were cached: a second run does not run the detector again.
    assert len(list((tmp_path / "cache" / "refiner_samples").glob("*.npz"))) == 1
    monkeypatch.setattr(tr, "extract_samples", lambda *a, **k: pytest.fail("samples not taken from the cache"))
    assert main(["train-refiner", str(cfg), "--model", str(trained_model_path), "--out", str(out), "--quiet"]) == 0


def test_a_refined_model_can_be_refined_again(trained_model_path: Path, scenes: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The samples come from the mask head (the old refiner left out); the old refiner is replaced."""
    monkeypatch.setenv("NANOSEG_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a.pt"
    assert main(["train-refiner", str(write_config(tmp_path / "a.yaml", scenes, epochs=1)),
                 "--model", str(trained_model_path), "--out", str(first), "--quiet"]) == 0
    cfg = write_config(tmp_path / "b.yaml", scenes, epochs=1, refiner={"size": 42, "channels": 4, "dilations": [1]})
    assert main(["train-refiner", str(cfg), "--model", str(first), "--out", str(tmp_path / "b.pt"), "--quiet"]) == 0
    again = load_checkpoint(tmp_path / "b.pt")
    assert again.model_config.mask_refiner is not None and again.model_config.mask_refiner.size == 42
    again.build()


def test_config_errors_name_the_field(trained_model_path: Path, scenes: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOSEG_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "x.pt")
    bad = write_config(tmp_path / "bad.yaml", scenes, epochs=1, holdout_images=5)
    assert main(["train-refiner", str(bad), "--model", str(trained_model_path), "--out", out]) == 2
    assert "holdout_images: 5 leaves no training image of 5" in capsys.readouterr().err
    unknown = write_config(tmp_path / "unknown.yaml", scenes, chanels=3)
    assert main(["train-refiner", str(unknown), "--model", str(trained_model_path), "--out", out]) == 2
    assert "chanels: unknown key" in capsys.readouterr().err
    assert not Path(out).exists()


def test_the_model_card_says_how_the_refiner_was_trained(trained_model_path: Path, scenes: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoseg_training.release_model import refiner_text

    monkeypatch.setenv("NANOSEG_CACHE", str(tmp_path / "cache"))
    cfg = load_yaml(write_config(tmp_path / "c.yaml", scenes, epochs=1), tr.RefinerTrainConfig)
    ckpt = tr.train_refiner(cfg, trained_model_path)
    text = refiner_text(ckpt.meta, ckpt.model_config)
    info = ckpt.meta["mask_refiner"]
    assert "nanoseg train-refiner" in text and f"{info['holdout_iou']:.4f}" in text and "the last 2 images" in text
    assert refiner_text(ckpt.meta, without_refiner(ckpt).model_config) == ""


def test_a_refiner_is_transplanted_onto_a_fine_tuned_network(trained_model_path: Path, scenes: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The donor's refiner weights and record move over; the receiving network's weights stay its own."""
    from nanoseg.checkpoint import file_sha256

    monkeypatch.setenv("NANOSEG_CACHE", str(tmp_path / "cache"))
    donor_path = tmp_path / "donor.pt"
    assert main(["train-refiner", str(write_config(tmp_path / "a.yaml", scenes, epochs=1)),
                 "--model", str(trained_model_path), "--out", str(donor_path), "--quiet"]) == 0
    donor = load_checkpoint(donor_path)
    network = without_refiner(load_checkpoint(trained_model_path))
    # a "fine-tuned" network: every weight moved a little
    network = dataclasses.replace(network, state_dict={k: v + 0.01 if v.is_floating_point() else v
                                                       for k, v in network.state_dict.items()})
    out = tr.transplant_refiner(network, donor, file_sha256(donor_path))
    assert out.model_config.mask_refiner == donor.model_config.mask_refiner
    for k, v in out.state_dict.items():
        source = donor if k.startswith("mask_refiner.") else network
        torch.testing.assert_close(v, source.state_dict[k])
    assert out.meta["mask_refiner"]["transplanted_from_sha256"] == file_sha256(donor_path)
    assert out.meta["mask_refiner"]["holdout_iou"] == donor.meta["mask_refiner"]["holdout_iou"]
    out.build()
    with pytest.raises(tr.ConfigError, match="no mask refiner"):
        tr.transplant_refiner(network, network, "0" * 64)
