"""Frame-preparation profiles (configs/profiles/*.yaml) and the model input spec."""

from __future__ import annotations

import pytest

from nanoseg.config_io import ConfigError, load_yaml, parse_yaml
from nanoseg.frame_profile import BackgroundI0, FrameProfile, ScalarI0
from nanoseg.input_spec import InputSpec
from nanoseg.paths import CONFIGS

PROFILES = CONFIGS / "profiles"


def test_shipped_profiles_validate() -> None:
    names = sorted(p.stem for p in PROFILES.glob("*.yaml"))
    assert names == ["em", "ptychography", "ptychography_od", "sem", "stxm", "tem"]
    od_input = load_yaml(PROFILES / "ptychography_od.yaml", FrameProfile)
    assert od_input.mode == "optical_density" and od_input.input == "optical_density"
    ptycho = load_yaml(PROFILES / "ptychography.yaml", FrameProfile)
    stxm = load_yaml(PROFILES / "stxm.yaml", FrameProfile)
    sem = load_yaml(PROFILES / "sem.yaml", FrameProfile)
    assert ptycho.name == "ptychography" and ptycho.mode == "optical_density"
    assert stxm.mode == "optical_density" and isinstance(stxm.i0, BackgroundI0)
    assert stxm.pixel_size_nm == 35.0
    assert sem.mode == "intensity" and sem.normalise and sem.normalise_percentiles == (0.5, 99.5)
    assert sem.tile_overlap_px < 512
    assert sem.expected_input == "optical_density" and sem.flatten_background  # bright particles, dark background
    tem = load_yaml(PROFILES / "tem.yaml", FrameProfile)
    assert tem.expected_input == "transmission" and tem.flatten_background and isinstance(tem.i0, BackgroundI0)
    assert load_yaml(PROFILES / "em.yaml", FrameProfile).expected_input == "auto"
    assert ptycho.expected_input == "transmission" and stxm.expected_input == "transmission"


def test_expected_input_defaults_follow_mode_and_invert() -> None:
    intensity = parse_yaml("name: x\nmode: intensity\n", FrameProfile)
    inverted = parse_yaml("name: x\nmode: intensity\ninvert: true\n", FrameProfile)
    assert (intensity.expected_input, inverted.expected_input) == ("optical_density", "transmission")
    assert parse_yaml("name: x\nmode: optical_density\npixel_size_nm: auto\n", FrameProfile).pixel_size_nm == "auto"


def test_scalar_i0_policy() -> None:
    p = parse_yaml("name: x\nmode: optical_density\ni0: {policy: scalar, value: 1200}\n", FrameProfile)
    assert isinstance(p.i0, ScalarI0) and p.i0.value == 1200


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\nmode: transmission\n", "mode"),
        ("name: x\nmode: optical_density\ni0: {policy: guess}\n", "i0"),
        ("name: x\nmode: optical_density\ni0: {policy: scalar}\n", "i0.scalar.value"),
        ("name: x\nmode: optical_density\ni0: {policy: scalar, value: -1}\n", "i0.scalar.value"),
        ("name: x\nmode: optical_density\ntile_overlap: 3\n", "tile_overlap"),
        ("name: x\nmode: optical_density\npixel_size_nm: 0\n", "pixel_size_nm"),
        ("name: x\nmode: optical_density\ninvert: true\n", "invert not used in optical_density mode"),
        ("name: x\nmode: intensity\ndark: 10\n", "dark not used in intensity mode"),
        ("name: x\nmode: intensity\nnormalise_percentiles: [90, 10]\n", "normalise_percentiles"),
        ("name: x\nmode: intensity\ninvert: true\ninput: optical_density\n", "contradicts"),
        ("name: x\nmode: optical_density\npixel_size_nm: big\n", "pixel_size_nm"),
    ],
)
def test_bad_profiles_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_yaml(text, FrameProfile, "p.yaml")


def test_input_spec_mapping_rules() -> None:
    spec = InputSpec(pixel_size_nm=8.0)
    assert (spec.mode, spec.intensity_mapping, spec.size) == ("optical_density", "image_max", 512)
    fixed = parse_yaml("pixel_size_nm: 8\nintensity_mapping: fixed\nod_max: 0.5\n", InputSpec)
    assert fixed.od_max == 0.5
    with pytest.raises(ConfigError, match="od_max is required"):
        parse_yaml("pixel_size_nm: 8\nintensity_mapping: fixed\n", InputSpec)
    with pytest.raises(ConfigError, match="od_max is only used"):
        parse_yaml("pixel_size_nm: 8\nod_max: 1.0\n", InputSpec)
    with pytest.raises(ConfigError, match="pixel_size_nm"):
        parse_yaml("size: 512\n", InputSpec)
