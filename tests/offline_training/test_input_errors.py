"""Bad user input to ``nanoseg train / evaluate / segment``: one line naming the file and the
record, exit 2; what is ignored is counted; odd image files (16-bit, palette, truncated) are
named or read as they look. Real small files, no training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nanoseg.cli import main
from nanoseg.config_io import ConfigError, dump_yaml
from nanoseg_training.evaluate import load_coco, read_gray
from nanoseg_training.image_files import UnreadableImage, read_gray8, read_image
from nanoseg_training.segment_files import cmd_segment, output_stems
from nanoseg_training.train_data import BadSampleError, CocoSource
from tests.offline_training.test_train import tiny_config

SIZE = 32


def write_set(root: Path, n: int = 2, edit: Any = None) -> Path:
    """A COCO set of ``n`` 32 px gray PNGs, one square polygon each; ``edit(coco)`` alters it."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(1, n + 1):
        Image.fromarray(np.full((SIZE, SIZE), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"images/{i}.png", "height": SIZE, "width": SIZE})
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]], "bbox": [4, 4, 16, 16], "area": 256})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "wire"}]}
    if edit is not None:
        edit(coco)
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def _del(key: str, where: str) -> Any:
    return lambda c: c[where][0].pop(key)


def _dup(c: dict[str, Any]) -> None:
    c["images"][1]["id"] = 1


BROKEN = {
    "no_images": (lambda c: c.pop("images"), r"no 'images' list"),
    "ann_no_image_id": (_del("image_id", "annotations"), r"annotations\[0\] \(id 1\) has no 'image_id'"),
    "image_no_file_name": (_del("file_name", "images"), r"images\[0\] has no 'file_name'"),
    "duplicate_id": (_dup, r"images\[1\] and images\[0\] have the same id 1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_coco_structure_is_refused_naming_file_and_record(case: str, tmp_path: Path) -> None:
    edit, message = BROKEN[case]
    root = write_set(tmp_path / case, edit=edit)
    with pytest.raises(BadSampleError, match=message) as err:
        CocoSource(root)
    assert str(root / "annotations.json") in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI: one line, exit 2


@pytest.mark.parametrize("case", ["no_images", "ann_no_image_id", "duplicate_id"])
def test_evaluate_load_coco_refuses_broken_sets(case: str, tmp_path: Path) -> None:
    edit, message = BROKEN[case]
    root = write_set(tmp_path / case, edit=edit)
    with pytest.raises(BadSampleError, match=message):
        load_coco(root)


def _train_args(tmp_path: Path, data: Path) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config(data, 1)))
    return ["train", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]


@pytest.mark.parametrize("case", ["nonexistent", "missing_image", "empty", "duplicate_id"])
def test_train_cli_data_errors_exit_2_before_writing(case: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    if case == "nonexistent":
        data = tmp_path / "no" / "dir"
    elif case == "missing_image":
        data = write_set(tmp_path / "set")
        (data / "images" / "1.png").unlink()
    elif case == "empty":
        data = write_set(tmp_path / "set", edit=lambda c: c.update(images=[], annotations=[]))
    else:
        data = write_set(tmp_path / "set", edit=_dup)
    assert main(_train_args(tmp_path, data)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nanoseg train: error: "), err
    if case == "missing_image":
        assert str(data / "images" / "1.png") in err[0] and "1 of 2" in err[0]
    assert not (tmp_path / "run").exists()


def test_missing_files_orphans_and_outside_polygons_are_counted(tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["annotations"].append({**c["annotations"][0], "id": 99, "image_id": 777})
        c["annotations"][1]["segmentation"] = [[500, 500, 560, 500, 560, 540, 500, 540]]

    root = write_set(tmp_path / "set", n=3, edit=edit)
    (root / "images" / "3.png").unlink()
    src = CocoSource(root)
    assert src.missing == [root / "images" / "3.png"]
    with pytest.raises(BadSampleError, match="1 of 3 images"):
        src.check("error")
    notes = src.check("skip")
    assert len(notes) == 2
    assert "1 of 3 image files are missing" in notes[0]
    assert "1 annotation(s) name no image" in notes[1] and "1 polygon annotation(s) lie wholly outside" in notes[1]


def test_all_files_missing_is_refused_even_when_skipping(tmp_path: Path) -> None:
    root = write_set(tmp_path / "set")
    for p in (root / "images").iterdir():
        p.unlink()
    with pytest.raises(BadSampleError, match=r"2 of 2 .* missing: all"):
        CocoSource(root).check("skip")


def test_sixteen_bit_png_without_profile_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "u16.png"
    Image.fromarray(np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)).save(path)
    with pytest.raises(UnreadableImage, match=r"u16\.png: I;16.* not 8-bit: set a frame profile"):
        read_gray(path)
    root = write_set(tmp_path / "set")
    Image.open(path).save(root / "images" / "1.png")
    with pytest.raises(BadSampleError, match="not 8-bit"):
        CocoSource(root).load(0)
    assert read_image(path).dtype == np.uint16  # with a profile it is read as it is


def test_truncated_png_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnreadableImage, match=r"cut\.png: cannot read image"):
        read_gray(path)
    with pytest.raises(UnreadableImage, match=r"cut\.png"):
        read_image(path)


def test_palette_png_is_read_as_its_gray(tmp_path: Path) -> None:
    gray = np.tile(np.linspace(50, 255, SIZE).astype(np.uint8), (SIZE, 1))
    path = tmp_path / "palette.png"
    Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    with Image.open(path) as im:
        assert im.mode == "P"
        shown = np.asarray(im.convert("L"))
    assert np.array_equal(read_image(path), shown)
    assert np.array_equal(read_gray8(path), shown.astype(np.float32))
    assert abs(float(read_image(path).mean()) - float(gray.mean())) < 10


def test_output_stems_are_unique() -> None:
    paths = [Path("a/same.png"), Path("b/same.png"), Path("same.tif"), Path("other.png"), Path("c/Same.PNG")]
    stems = output_stems(paths)
    assert stems == ["same_png", "same_png_2", "same_tif", "other", "Same_PNG_3"]
    assert len({s.lower() for s in stems}) == len(stems)


def test_segment_unreadable_flat_field_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "frame.png"
    Image.fromarray(np.full((SIZE, SIZE), 100, np.uint8)).save(image)
    args = argparse.Namespace(images=[str(image)], flat_field=str(tmp_path / "nope.tif"), model=None,
                              engine="torch", threads=1, mask_tta=None, max_detections=None, profile="em",
                              score_threshold=None, mask_threshold=None, mask_rescoring=None,
                              edge_rule="exclude", out=str(tmp_path / "out"), pixel_size=None, quiet=True)
    assert cmd_segment(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--flat-field" in err[0] and "nope.tif" in err[0], err


@pytest.mark.parametrize("limit", [None, 0])
def test_evaluate_with_no_images_exits_2(limit: int | None, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = write_set(tmp_path / "set", n=1 if limit == 0 else 0)
    argv = ["evaluate", str(tmp_path / "model.pt"), str(root), "--out", str(tmp_path / "out"), "--quiet"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no images to evaluate" in err[0], err


def test_the_preparation_record_counts_the_pixels_replaced() -> None:
    """A frame half NaN: the segment/evaluate record says how many pixels were replaced, by kind."""
    from nanoseg.frame_profile import FrameProfile
    from nanoseg.input_spec import InputSpec
    from nanoseg.prepare import prepare_frame
    from nanoseg_training.frame_eval import preparation_record

    frame = np.random.default_rng(0).uniform(500, 1000, (64, 64))
    frame[:32] = np.nan
    profile = FrameProfile.model_validate({"name": "f", "mode": "optical_density", "tile_overlap_px": 16})
    record = preparation_record(prepare_frame(frame, profile, InputSpec(pixel_size_nm=8.0, size=64)))
    assert record["invalid_nan"] == 32 * 64 and record["invalid_pixels"] >= 32 * 64


@pytest.mark.parametrize("flag", [["--max-iter", "-5"], ["--stop-after", "0"], ["--max-minutes", "nan"]])
def test_train_limits_must_be_positive(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Refused by name before anything is read or written (``--max-iter -5`` made a run directory
    and then blamed the run's own config.yaml)."""
    from nanoseg.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "no-such-config", *flag])
    assert info.value.code == 2 and f"argument {flag[0]}: must be > 0" in capsys.readouterr().err
