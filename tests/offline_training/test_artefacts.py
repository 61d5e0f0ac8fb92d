"""Domain randomisation: end caps, aspect ratios, bundles, looks and the artefacts of real images."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from nanoseg.config_io import load_yaml, parse_config
from nanoseg.paths import resolve_config
from nanoseg_training.artefacts import figure_marks, halo
from nanoseg_training.coco_dataset import make_sample
from nanoseg_training.rendering import render
from nanoseg_training.scene import deposit, draw_int, generate_scene, voxelise
from nanoseg_training.synthetic_config import IntRange, SceneConfig
from nanoseg_training.wire_geometry import WireGeometry, rasterise

ROD = WireGeometry((20.0, 48.0), 0.0, 60.0, 16.0, 10.0)  # horizontal, 60 x 16 px, x 20-80, y 40-56


def footprint(g: WireGeometry, shape: tuple[int, int] = (96, 112)) -> np.ndarray:
    cols = rasterise(g, shape)
    assert cols is not None
    m = np.zeros(shape, bool)
    y0, y1, x0, x1 = cols.box
    m[y0:y1, x0:x1] = cols.thickness > 0
    return m


def test_round_caps_cut_the_corners_and_keep_the_tip_to_tip_length() -> None:
    flat, rnd = footprint(ROD), footprint(WireGeometry(**{**ROD.__dict__, "end_cap": "round"}))
    cols = np.flatnonzero(rnd.any(axis=0))
    assert cols[0] == 20 and cols[-1] == 79  # same extent as the flat rod: caps are inside the length
    r = ROD.width / 2
    expected = flat.sum() - (4 - math.pi) * r * r  # two half discs instead of two squares
    assert rnd.sum() == pytest.approx(expected, rel=0.03)
    assert rnd[:, 20].sum() < 0.5 * flat[:, 20].sum()  # the tip is narrow
    assert rnd[:, 50].sum() == flat[:, 50].sum()  # the body is untouched


def test_faceted_caps_lie_between_flat_and_round() -> None:
    wide = WireGeometry((20.0, 48.0), 0.0, 70.0, 32.0, 10.0)
    areas = {cap: footprint(WireGeometry(**{**wide.__dict__, "end_cap": cap})).sum()
             for cap in ("flat", "round", "faceted")}
    assert areas["round"] < areas["faceted"] < areas["flat"]
    r = wide.width / 2  # each of 4 corners loses a right triangle with legs r / 2
    assert areas["flat"] - areas["faceted"] == pytest.approx(4 * (r / 2) ** 2 / 2, rel=0.15)


def scene_config(wires: dict[str, Any], non_prismatic: dict[str, Any] | None = None,
                 rendering: dict[str, Any] | None = None) -> SceneConfig:
    base = {"count": {"low": 6, "high": 6}, "length": {"low": 10, "high": 80},
            "width": {"low": 4, "high": 10}, "min_visible_area": 5, "tilt_max_deg": 0.0}
    return parse_config({
        "name": "t", "domain": {"width": 96, "depth": 96, "height": 80},
        "wires": base | wires, "non_prismatic": non_prismatic or {},
        "rendering": rendering or {"blur_sigma": 0.0},
    }, SceneConfig)


def test_aspect_ratio_sets_the_length_within_the_length_bounds() -> None:
    cfg = scene_config({"aspect_ratio": {"low": 3.0, "high": 3.0}})
    rng = np.random.default_rng(0)
    scene = generate_scene(cfg, rng)
    for w in scene.wires:
        g = w.geometry
        assert g.length == pytest.approx(min(max(3.0 * g.width, 10.0), 80.0))


def test_end_caps_are_drawn_by_weight() -> None:
    cfg = scene_config({"end_caps": {"flat": 0.0, "round": 1.0, "faceted": 0.0}})
    scene = generate_scene(cfg, np.random.default_rng(1))
    assert scene.wires and {w.geometry.end_cap for w in scene.wires} == {"round"}


def test_bundles_add_parallel_neighbours_that_never_interpenetrate() -> None:
    cfg = scene_config({"count": {"low": 2, "high": 2}, "length": {"low": 40, "high": 60}},
                       {"bundle": {"probability": 1.0, "size": {"low": 3, "high": 3}}})
    scene = generate_scene(cfg, np.random.default_rng(2))
    assert len(scene.wires) > 2  # neighbours were added
    angles = {round(w.geometry.angle_deg, 6) for w in scene.wires}
    assert len(angles) <= 2  # each bundle is parallel to its first wire
    voxelise(scene)  # raises if two wires share a voxel


def test_loguniform_counts_stay_in_range_and_favour_small_values() -> None:
    r = IntRange(low=1, high=80, distribution="loguniform")
    rng = np.random.default_rng(3)
    draws = np.array([draw_int(r, rng) for _ in range(4000)])
    assert draws.min() >= 1 and draws.max() <= 80
    assert np.median(draws) < 15  # uniform would give ~40


def two_rods_scene(rendering: dict[str, Any]):
    cfg = scene_config({}, rendering={"blur_sigma": 0.0, **rendering})
    return deposit(cfg, [WireGeometry((10.0, 30.0), 0.0, 60.0, 8.0, 6.0),
                         WireGeometry((10.0, 70.0), 0.0, 60.0, 8.0, 6.0)])


def test_every_artefact_leaves_the_labels_alone_and_changes_the_image() -> None:
    # percentile mapping: a dark halo on a zero background is visible (image_max would clip it)
    plain = two_rods_scene({"normalisation": "percentile"})
    base = render(plain, np.random.default_rng(5)).gray
    effects = {
        "texture": {"probability": 1.0}, "gradient": {"probability": 1.0},
        "halo": {"probability": 1.0}, "debris": {"probability": 1.0},
        "invert": {"probability": 1.0}, "jpeg": {"probability": 1.0, "quality": {"low": 20, "high": 20}},
        "figure_marks": {"probability": 1.0},
    }
    for name, spec in effects.items():
        scene = two_rods_scene({"normalisation": "percentile", "artefacts": {name: spec}})
        img = render(scene, np.random.default_rng(5)).gray
        assert [w.area for w in scene.wires] == [w.area for w in plain.wires], name
        assert not np.array_equal(img, base), name


def test_an_artefact_with_probability_zero_draws_nothing() -> None:
    a = render(two_rods_scene({}), np.random.default_rng(6)).gray
    b = render(two_rods_scene({"artefacts": {"halo": {"probability": 0.0}, "jpeg": {"probability": 0.0}}}),
               np.random.default_rng(6)).gray
    assert np.array_equal(a, b)


def test_halo_is_a_rim_outside_the_objects() -> None:
    material = np.zeros((40, 40), np.float32)
    material[15:25, 10:30] = 1.0
    rim = halo(material, 2.0)
    assert rim[material > 0].max() == 0.0
    assert rim[13, 20] > 0.3 and rim[2, 2] < 1e-3  # just outside the edge; far away nothing


def test_inversion_makes_objects_dark() -> None:
    scene = two_rods_scene({"artefacts": {"invert": {"probability": 1.0}}})
    gray = render(scene, np.random.default_rng(7)).gray
    inside = scene.wires[0].full_mask(scene.shape)
    assert gray[inside].mean() < gray[~inside].mean()


def test_figure_marks_draw_a_scale_bar_in_a_bottom_corner() -> None:
    gray = np.full((256, 256), 128, np.uint8)
    marked = figure_marks(gray, np.random.default_rng(8))
    changed = marked != 128
    assert changed.any()
    values, counts = np.unique(marked[changed], return_counts=True)
    assert values[np.argmax(counts)] in (0, 255)  # solid black or white ink (text is antialiased)
    assert changed[192:].any()  # the bar sits in the bottom quarter


def test_sem_look_in_mixed_mode_drops_hidden_wires_and_draws_its_look() -> None:
    cfg = scene_config({"count": {"low": 8, "high": 8}},
                       rendering={"blur_sigma": 0.0, "mode": "mixed",
                                  "looks": {"optical_density": 0.0, "sem": 1.0}})
    s = make_sample(cfg, 1, 0)
    assert s.image.gray.dtype == np.uint8 and s.image.dose is None
    visible = np.bincount(s.scene.top_label.ravel(), minlength=len(s.scene.wires) + 1)[1:]
    assert (visible >= cfg.wires.min_visible_area).all()


def test_the_randomised_preset_renders_seeded_and_exact() -> None:
    cfg = load_yaml(resolve_config("randomised", "synthetic"), SceneConfig)
    a, b = make_sample(cfg, 4, 2), make_sample(cfg, 4, 2)
    assert np.array_equal(a.image.gray, b.image.gray)
    assert a.image.gray.shape == (512, 512)
    assert len(a.scene.wires) >= 1
