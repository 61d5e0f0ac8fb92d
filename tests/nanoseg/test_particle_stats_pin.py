"""The particle table and frame summaries equal, to the last bit, what an earlier (slower) version
of the statistics gave for the same masks (``data/make_particle_stats_pin.py`` wrote them): speed
work on the statistics may not change a result."""

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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_statistics_equal_the_pinned_results(name: str) -> None:
    exp = EXPECTED[name]
    masks = _masks(name)
    od = np.random.default_rng(1).random(masks.image_shape) if exp["od"] else None
    table = particle_table(masks, od, exp["pixel_size_nm"])  # type: ignore[arg-type]
    got = json.loads(json.dumps(table.to_dict()))
    for col, values in exp["table"]["columns"].items():
        assert got["columns"][col] == values, col
    assert got == exp["table"]
    assert (None if table.mean_od is None else table.mean_od.tolist()) == exp["mean_od"]
    for c, e in zip(table.centrelines, exp["centrelines"], strict=True):
        assert (c is None) == (e is None)
        if c is not None:
            assert (c.points.tolist(), c.width_px.tolist(), c.length_px, c.chord_px) == (
                e["points"], e["width_px"], e["length_px"], e["chord_px"])
    for rule in EDGE_RULES:
        assert json.loads(json.dumps(frame_summary(table, rule).to_dict())) == exp["summaries"][rule], rule
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
