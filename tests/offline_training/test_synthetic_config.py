"""The scene schema: presets load, bad values fail naming the field."""

from __future__ import annotations

import pytest

from nanoseg.config_io import ConfigError, dump_yaml, load_yaml, parse_yaml
from nanoseg.paths import CONFIGS, resolve_config
from nanoseg_training.synthetic_config import SceneConfig

PRESETS = ["paper", "ptychography", "stxm", "sem", "randomised"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name: str) -> None:
    cfg = load_yaml(resolve_config(name, "synthetic"), SceneConfig)
    assert cfg.name == name
    assert parse_yaml(dump_yaml(cfg), SceneConfig) == cfg


def test_every_preset_file_is_tested() -> None:
    assert sorted(p.stem for p in (CONFIGS / "synthetic").glob("*.yaml")) == sorted(PRESETS)


def test_paper_preset_is_the_papers_generator() -> None:
    cfg = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    d = cfg.domain
    assert (d.width, d.depth, d.height) == (512, 512, 200)
    assert cfg.od_per_voxel == pytest.approx(1 / 200)  # sum / total thickness
    r = cfg.rendering
    assert (r.mode, r.normalisation, r.blur_sigma, r.blur_sigma_jitter) == ("optical_density", "image_max", 2.0, 0.0)
    assert not r.noise.enabled and not r.background.enabled
    npm = cfg.non_prismatic
    assert [npm.taper.probability, npm.bend.probability, npm.roughness.probability,
            npm.sintering.probability] == [0.0] * 4
    # ~20 wires at most, so the benchmark's "512 x 512 with ~20 wires" is this preset.
    assert cfg.wires.count.high == 20


def test_the_extras_are_on_in_the_instrument_presets() -> None:
    for name in ("ptychography", "stxm", "sem"):
        cfg = load_yaml(resolve_config(name, "synthetic"), SceneConfig)
        assert cfg.rendering.noise.enabled and cfg.rendering.background.enabled
        assert cfg.non_prismatic.taper.probability > 0
    assert load_yaml(resolve_config("sem", "synthetic"), SceneConfig).rendering.mode == "sem"


def error_for(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, SceneConfig, "scene.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wires: {colour: red}", "scene.yaml: wires.colour: unknown key"),
        ("rendering: {noise: {dose: {low: 1, high: 2, shape: 3}}}", "scene.yaml: rendering.noise.dose.shape: unknown key"),
        ("wires: {count: {low: -1, high: 3}}", "scene.yaml: wires.count.low: Input should be greater than or equal to 0"),
        ("wires: {tilt_max_deg: 45}", "scene.yaml: wires.tilt_max_deg: Input should be less than or equal to 30"),
        ("rendering: {blur_sigma: -1}", "scene.yaml: rendering.blur_sigma: Input should be greater than or equal to 0"),
        ("non_prismatic: {taper: {probability: 1.5}}", "scene.yaml: non_prismatic.taper.probability: Input should be less than or equal to 1"),
        ("wires: {width: {low: 20, high: 10}}", "scene.yaml: wires.width.high: must be >= low (20.0)"),
        ("wires: {count: {low: 9, high: 3}}", "scene.yaml: wires.count.high: must be >= low (9)"),
        ("wires: {length: {low: 0, high: 10, distribution: loguniform}}", "scene.yaml: wires.length: loguniform needs low > 0"),
        ("wires: {width: {low: .nan, high: 10}}", "scene.yaml: wires.width.low: Input should be a finite number"),
        ("rendering: {od_per_voxel: .inf}", "scene.yaml: rendering.od_per_voxel: Input should be a finite number"),
        ("rendering: {mode: xray}", "scene.yaml: rendering.mode: Input should be 'optical_density', 'sem' or 'mixed'"),
        ("domain: {height: 5}", "domain.height must exceed the thinnest wire's thickness"),
        ("wires: {cross_sections: {rectangle: 0, hexagon: 0}}", "wires.cross_sections: at least one cross-section weight must be > 0"),
    ],
)
def test_errors_name_the_field(text: str, expected: str) -> None:
    assert expected in error_for(text)


def test_every_error_is_reported_at_once() -> None:
    message = error_for("wires: {colour: red, width: {low: 20, high: 10}}\nrendering: {blur_sigma: 99}")
    lines = message.splitlines()
    assert len(lines) == 3
    assert {line.split(": ")[1] for line in lines} == {"wires.colour", "wires.width.high", "rendering.blur_sigma"}


def test_defaults_are_the_documented_domain() -> None:
    cfg = parse_yaml("", SceneConfig)
    assert (cfg.domain.width, cfg.domain.depth, cfg.domain.height) == (512, 512, 200)
    assert cfg.od_per_voxel == pytest.approx(1 / 200)
    assert parse_yaml("rendering: {od_per_voxel: 0.02}", SceneConfig).od_per_voxel == 0.02
