"""The particle table and frame summaries equal what an earlier (slower) version of the statistics
gave for the same masks (``data/make_particle_stats_pin.py`` wrote them): speed work on the
statistics may not change a result.

Equal means: the same structure, counts, flags and missing values, and every float within
``REL`` of the pinned one. With the numpy the pin was written with, the results are the same
to the last bit; another numpy build's LAPACK (the moments' eigen-solver) moves the last bits,
seen up to 2e-12 relative (numpy 2.4.6), and a changed computation moves them far more."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from nanoseg.instances import BoxMasks
from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg.summary_stats import EDGE_RULES

DATA = Path(__file__).resolve().parent / "data"
REL = 1e-9
"""Largest relative difference of a float from the pinned one (see the module docstring)."""
EXPECTED = json.loads(gzip.decompress((DATA / "particle_stats_pin.json.gz").read_bytes()))


def _masks(name: str) -> BoxMasks:
    with np.load(DATA / "particle_stats_pin.npz") as z:
        offsets = z[f"{name}/offsets"]
        crops = []
        for i in range(len(offsets)):
            shape = tuple(z[f"{name}/crop{i}_shape"])
            bits = np.unpackbits(z[f"{name}/crop{i}"], count=int(np.prod(shape)))
            crops.append(bits.astype(bool).reshape(shape))
        return BoxMasks(tuple(z[f"{name}/shape"]), offsets, crops)


def _assert_same(got: object, expected: object, where: str) -> None:
    """``got == expected`` but for floats, which may differ by ``REL`` (relative)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for k, v in expected.items():
            _assert_same(got[k], v, f"{where}/{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, float) and isinstance(got, float):
        assert got == pytest.approx(expected, rel=REL, abs=0.0), where
    else:
        assert type(got) is type(expected) and got == expected, where


def test_the_comparison_tells_a_changed_float_and_value_from_the_last_bits() -> None:
    _assert_same({"a": [1.0, None, True, 3]}, {"a": [1.0 + 1e-13, None, True, 3]}, "x")
    for changed in ({"a": [1.0 + 1e-7, None, True, 3]}, {"a": [1.0, 0.0, True, 3]}, {"a": [1.0, None, 1, 3]},
                    {"a": [1.0, None, True, 4]}, {"a": [1.0, None, True]}, {"b": [1.0, None, True, 3]}):
        with pytest.raises(AssertionError):
            _assert_same(changed, {"a": [1.0, None, True, 3]}, "x")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_statistics_equal_the_pinned_results(name: str) -> None:
    exp = EXPECTED[name]
    masks = _masks(name)
    od = np.random.default_rng(1).random(masks.image_shape) if exp["od"] else None
    table = particle_table(masks, od, exp["pixel_size_nm"])  # type: ignore[arg-type]
    got = json.loads(json.dumps(table.to_dict()))
    _assert_same(got, exp["table"], "table")  # a failure names the column and row (table/columns/NAME[i])
    _assert_same(None if table.mean_od is None else table.mean_od.tolist(), exp["mean_od"], "mean_od")
    for c, e in zip(table.centrelines, exp["centrelines"], strict=True):
        assert (c is None) == (e is None)
        if c is not None:
            _assert_same([c.points.tolist(), c.width_px.tolist(), c.length_px, c.chord_px],
                         [e["points"], e["width_px"], e["length_px"], e["chord_px"]], "centreline")
    for rule in EDGE_RULES:
        _assert_same(json.loads(json.dumps(frame_summary(table, rule).to_dict())), exp["summaries"][rule], rule)
    assert len(table) > 0


@pytest.mark.parametrize("pixel_size_nm", [None, 8.0, 2.5])
@pytest.mark.parametrize("edge_rule", ["include", "exclude"])
def test_a_frame_without_particles_has_the_computed_summary(pixel_size_nm: float | None, edge_rule: str) -> None:
    """Empty frames take a cached summary: equal to the one computed, with their own shape and pixel size."""
    from nanoseg.particle_stats import _frame_summary

    for shape, od in (((128, 128), True), ((7, 300), False), ((128, 128), True), ((7, 300), True)):
        table = particle_table(np.zeros((0, *shape), bool), np.zeros(shape, np.float32) if od else None, pixel_size_nm)
        got = frame_summary(table, edge_rule)  # type: ignore[arg-type]
        assert got == _frame_summary(table, edge_rule, 1000, 0, 0.05)  # type: ignore[arg-type]
        assert got.frame_shape == shape and got.pixel_size_nm == pixel_size_nm and got.count == 0
