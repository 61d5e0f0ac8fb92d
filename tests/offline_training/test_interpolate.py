"""nanoseg models interpolate: weights between a model and a fine-tune of it, alpha given or chosen."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from nanoseg.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from nanoseg.cli import main
from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.interpolate import Candidate, choose_alpha, interpolate, soup
from nanoseg_training.synthetic_config import SceneConfig


@pytest.fixture(scope="module")
def tuned_path(trained_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in fine-tune: every float weight of the shipped model moved by seeded noise, and
    the batch-norm counters dropped as a run with frozen batch norm drops them."""
    ckpt = load_checkpoint(trained_model_path)
    gen = torch.Generator().manual_seed(0)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
             for k, v in ckpt.state_dict.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("interp") / "tuned.pt"
    save_checkpoint(dataclasses.replace(ckpt, state_dict=state, meta={"name": "noisy", "iterations": 7}), path)
    return path


def test_interpolate_is_the_straight_line_between_the_weights(trained_model_path: Path, tuned_path: Path) -> None:
    start, tuned = load_checkpoint(trained_model_path), load_checkpoint(tuned_path)
    key = "backbone.body.conv1.weight"
    for alpha in (0.0, 0.3, 1.0):
        w = interpolate(start, tuned, alpha)
        assert w.keys() == start.state_dict.keys()
        torch.testing.assert_close(w[key], (1 - alpha) * start.state_dict[key] + alpha * tuned.state_dict[key])
        counter = "backbone.body.bn1.num_batches_tracked"  # absent from the fine-tune: the start's
        assert torch.equal(w[counter], start.state_dict[counter])
    with pytest.raises(CheckpointError, match="alpha"):
        interpolate(start, tuned, 1.5)
    with pytest.raises(CheckpointError, match="body_alpha"):
        interpolate(start, tuned, 0.5, body_alpha=-0.1)
    bad = dataclasses.replace(tuned, state_dict=tuned.state_dict | {key: torch.zeros(1)})
    with pytest.raises(CheckpointError, match=key):
        interpolate(start, bad, 0.5)


def test_the_backbone_body_may_take_its_own_alpha(trained_model_path: Path, tuned_path: Path) -> None:
    start, tuned = load_checkpoint(trained_model_path), load_checkpoint(tuned_path)
    w = interpolate(start, tuned, 0.2, body_alpha=0.7)
    for key, alpha in (("backbone.body.conv1.weight", 0.7), ("backbone.body.layer4.0.conv1.weight", 0.7),
                       ("backbone.fpn.inner_blocks.0.0.weight", 0.2), ("roi_heads.mask_predictor.mask_fcn_logits.weight", 0.2)):
        torch.testing.assert_close(w[key], torch.lerp(start.state_dict[key].float(), tuned.state_dict[key].float(), alpha))


def test_a_soup_is_the_mean_of_the_fine_tunes(trained_model_path: Path, tuned_path: Path) -> None:
    start, tuned = load_checkpoint(trained_model_path), load_checkpoint(tuned_path)
    assert soup([tuned]) is tuned
    mean = soup([start, tuned])
    halfway = interpolate(start, tuned, 0.5)
    for key, value in mean.state_dict.items():
        torch.testing.assert_close(value, halfway[key])  # the counters only the first has: the first's
    assert mean.meta == start.meta
    with pytest.raises(CheckpointError, match="at least one"):
        soup([])
    key = "backbone.body.conv1.weight"
    with pytest.raises(CheckpointError, match=key):
        soup([start, dataclasses.replace(tuned, state_dict=tuned.state_dict | {key: torch.zeros(1)})])


def test_interpolate_cli_averages_several_fine_tunes(trained_model_path: Path, tuned_path: Path,
                                                      tmp_path: Path) -> None:
    """Two fine-tunes on the command line: the line runs to their mean, and the card names both."""
    from nanoseg_training.release_model import interpolation_text

    out = tmp_path / "soup.pt"
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), str(trained_model_path),
                 "--alpha", "0.5", "--out", str(out)]) == 0
    start, tuned, ckpt = load_checkpoint(trained_model_path), load_checkpoint(tuned_path), load_checkpoint(out)
    key = "backbone.body.conv1.weight"  # 0.5 start + 0.5 * (tuned + start) / 2, stored as float16
    torch.testing.assert_close(ckpt.state_dict[key].float(),
                               0.75 * start.state_dict[key].float() + 0.25 * tuned.state_dict[key].float(),
                               atol=2e-3, rtol=1e-2)
    rec = ckpt.meta["interpolation"]
    assert [t["sha256"] for t in rec["tuned"]] == [file_sha256(tuned_path), file_sha256(trained_model_path)]
    assert "the average of its 2 fine-tunes (`noisy` (7 iterations)" in interpolation_text(ckpt.meta)


def test_choose_alpha_keeps_the_start_s_accuracy_within_the_margin() -> None:
    rows = [Candidate(0.0, 86.0, 5.0), Candidate(0.25, 85.5, 6.0), Candidate(0.5, 84.0, 7.5),
            Candidate(0.75, 80.0, 9.0)]
    assert choose_alpha(rows, 1.0).alpha == 0.25
    assert choose_alpha(rows, 2.0).alpha == 0.5
    assert choose_alpha(rows, 0.0).alpha == 0.0  # nothing else keeps it: the start
    assert choose_alpha([Candidate(0.0, 86.0, 6.0), Candidate(0.5, 86.0, 6.0)], 1.0).alpha == 0.0  # tie: smaller
    pairs = [Candidate(0.0, 86.0, 5.0, 0.0), Candidate(0.0, 85.0, 6.5, 0.5), Candidate(0.2, 85.2, 6.5, 0.5),
             Candidate(0.2, 84.0, 8.0, 0.8)]
    assert choose_alpha(pairs, 1.0) == pairs[1]  # the body alone; a tie with (0.2, 0.5) goes to the smaller alpha
    assert choose_alpha(pairs, 2.0) == pairs[3]
    with pytest.raises(ValueError, match="alpha 0"):
        choose_alpha(pairs[1:], 1.0)  # (0, body 0.5) is not the start
    with pytest.raises(ValueError, match="alpha 0"):
        choose_alpha(rows[1:], 1.0)


def test_interpolate_cli_one_alpha(trained_model_path: Path, tuned_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "mid.pt"
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), "--alpha", "0.5",
                 "--out", str(out)]) == 0
    ckpt, start = load_checkpoint(out), load_checkpoint(trained_model_path)
    rec = ckpt.meta["interpolation"]
    assert rec["alpha"] == 0.5 and rec["start_sha256"] == file_sha256(trained_model_path)
    assert rec["tuned"] == [{"sha256": file_sha256(tuned_path), "name": "noisy", "iterations": 7, "config": None,
                             "runs": [{"name": "noisy", "iterations": 7}]}]  # no lineage of its own: its one run
    assert ckpt.meta["operating_point"] == start.meta["operating_point"]  # the start's, with its refiner
    assert ckpt.model_config == start.model_config and ckpt.stored_half
    ckpt.build()
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), "--alpha", "2",
                 "--out", str(out)]) == 2


def test_interpolate_cli_chooses_alpha_on_validation_sets(trained_model_path: Path, tuned_path: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The noisy 'fine-tune' loses accuracy along the line; the choice follows the rule on the
    measured figures, which are written beside the checkpoint."""
    val = tmp_path / "paper-s5-n2"
    write_dataset(load_yaml(resolve_config("paper", "synthetic"), SceneConfig), val, 5, 2, workers=1, write_od=False)
    out = tmp_path / "chosen.pt"
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), "--alphas", "1,0.2",
                 "--keep-set", str(val), "--gain-set", str(val), "--keep-within", "0.5", "--out", str(out),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "alpha 0: " in printed and "alpha 1: " in printed
    rec = load_checkpoint(out).meta["interpolation"]
    rows = [Candidate(**c) for c in rec["candidates"]]
    assert [c.alpha for c in rows] == [0.0, 0.2, 1.0]
    assert rows[2].keep_ap < rows[0].keep_ap - 5  # noise of 0.05 on every weight ruins the model
    assert rec["alpha"] == choose_alpha(rows, 0.5).alpha != 1.0
    assert json.loads((tmp_path / "chosen" / "choice.json").read_text())["alpha"] == rec["alpha"]
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), "--alphas", "0.5",
                 "--out", str(out)]) == 2  # no validation sets
    # the backbone body's own alphas: every pair is a candidate, the start (0, 0) among them
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), "--alphas", "0.5",
                 "--body-alphas", "0.2", "--keep-set", str(val), "--gain-set", str(val), "--keep-within", "0.5",
                 "--out", str(out), "--threads", "1"]) == 0
    rec = load_checkpoint(out).meta["interpolation"]
    rows = [Candidate(**c) for c in rec["candidates"]]
    assert [(c.alpha, c.body_alpha) for c in rows] == [(0.0, 0.0), (0.0, 0.2), (0.5, 0.2)]
    best = choose_alpha(rows, 0.5)
    assert (rec["alpha"], rec["body_alpha"]) == (best.alpha, best.body_alpha)
    assert main(["models", "interpolate", str(trained_model_path), str(tuned_path), "--alphas", "0.5",
                 "--body-alpha", "0.2", "--keep-set", str(val), "--gain-set", str(val), "--out", str(out)]) == 2


def test_the_model_card_says_how_the_weights_were_interpolated_and_chosen() -> None:
    from nanoseg_training.release_model import interpolation_text

    assert interpolation_text({}) == ""
    # the shipped default's record is in the older one-fine-tune form; the card reads both
    rec = {"alpha": 0.4, "start_sha256": "a" * 64, "tuned_sha256": "b" * 64, "tuned_name": "run",
           "tuned_iterations": 800, "tuned_config": "default_variety_cpu"}
    one = interpolation_text({"interpolation": rec})
    assert "0.6 x the network above (`aaaaaaaaaaaa`)" in one and "`default_variety_cpu` (800 iterations), `bbbbbbbbbbbb`" in one
    two = interpolation_text({"interpolation": rec | {"tuned_runs": [{"name": "a", "iterations": 800},
                                                                      {"name": "b", "iterations": 600}]}})
    assert "`a` (800 iterations) then `b` (600 iterations), `bbbbbbbbbbbb`" in two
    chosen = rec | {"chosen_on": {"keep_set": "paper-val", "gain_set": "randomised-val", "keep_within": 1.5},
                    "candidates": [{"alpha": 0.0, "keep_ap": 84.7, "gain_ap": 2.3},
                                   {"alpha": 0.4, "keep_ap": 83.9, "gain_ap": 5.0}]}
    text = interpolation_text({"interpolation": chosen})
    assert "within 1.5 of the start's" in text and "| 0.4 | 83.9 | 5.0 |" in text
    pairs = chosen | {"body_alpha": 0.6, "candidates": [{"alpha": 0.0, "body_alpha": 0.0, "keep_ap": 84.7, "gain_ap": 2.3},
                                                        {"alpha": 0.2, "body_alpha": 0.6, "keep_ap": 83.5, "gain_ap": 7.0}]}
    text = interpolation_text({"interpolation": pairs})
    assert "(the backbone's ResNet stages at 0.6)" in text and "| alpha | backbone alpha |" in text
    assert "| 0.2 | 0.6 | 83.5 | 7.0 |" in text
