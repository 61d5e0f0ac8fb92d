"""Sequential deposition: wires never interpenetrate, rest on the substrate or on earlier wires."""

from __future__ import annotations

import numpy as np
import pytest

from nanoseg_training.scene import Scene, deposit, drop_hidden, generate_scene, voxelise
from nanoseg_training.wire_geometry import WireGeometry, rasterise

SEEDS = range(40)


def column_runs(scene: Scene) -> np.ndarray:
    """How many wires claim each voxel (z, y, x), from each wire's own column runs."""
    H, W = scene.shape
    claims = np.zeros((scene.config.domain.height, H, W), np.int32)
    ks = np.arange(scene.config.domain.height)[:, None, None]
    for w in scene.wires:
        y0, y1, x0, x1 = w.box
        claims[:, y0:y1, x0:x1] += (ks >= w.lowest) & (ks < w.lowest + w.counts)
    return claims


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_wires_never_share_a_voxel(small_config, seed: int) -> None:
    scene = generate_scene(small_config(), np.random.default_rng(seed))
    claims = column_runs(scene)
    assert claims.max() <= 1
    np.testing.assert_array_equal(claims.sum(axis=0), scene.thickness)
    labels = voxelise(scene)  # raises if the generator itself sees interpenetration
    np.testing.assert_array_equal(labels > 0, claims > 0)
    for w in scene.wires:
        assert int((w.lowest + w.counts)[w.counts > 0].max()) <= scene.config.domain.height


def test_each_wire_rests_on_the_substrate_or_on_earlier_wires(small_config) -> None:
    """Replaying deposition: every column with material sits at or above the earlier surface,
    touches it in at least one column, and a wire over bare substrate lies at z0 = 0."""
    cfg = small_config()
    on_substrate = on_wires = 0
    for seed in SEEDS:
        scene = generate_scene(cfg, np.random.default_rng(seed))
        surface = np.zeros(scene.shape, np.int32)  # first free voxel before each wire
        for w in scene.wires:
            g = w.geometry
            cols = rasterise(g, scene.shape)
            assert cols is not None and cols.box == w.box
            y0, y1, x0, x1 = w.box
            material = cols.thickness > 0
            below = surface[y0:y1, x0:x1][material]
            gap = cols.bottom(g.z0, g.tilt_deg) - below  # bottoms of the material columns
            assert gap.min() >= -1e-9  # nowhere below the earlier surface
            if below.max() == 0:
                assert g.z0 == 0.0  # nothing under it: on the substrate
                if not w.truncated:  # its start (s = 0, bottom at z0) is in the field
                    assert w.lowest[w.counts > 0].min() == 0
                on_substrate += 1
            elif g.z0 > 0:
                assert gap.min() == pytest.approx(0.0, abs=1e-6)  # touches, does not float
                on_wires += 1
            occ = w.counts > 0
            assert np.all(w.lowest[occ] >= surface[y0:y1, x0:x1][occ])
            surface[y0:y1, x0:x1][occ] = (w.lowest + w.counts)[occ]
        np.testing.assert_array_equal(surface, scene.top)
    assert on_substrate > 100 and on_wires > 50  # both cases really occur


CROSSING_A = WireGeometry((4.3, 32.2), 0.0, 55.0, 10.4, 8.3, "rectangle")
CROSSING_B = WireGeometry((30.7, 60.1), 90.0, 55.0, 9.2, 6.6, "rectangle")


def test_a_wire_deposited_across_another_sits_on_top_of_it(small_config) -> None:
    scene = deposit(small_config(), [CROSSING_A, CROSSING_B])
    a, b = scene.wires
    # A on the substrate: centres 0.5 .. 7.5 lie below its top at 8.3, so 8 voxels, top at 8.
    assert a.geometry.z0 == 0.0
    assert set(np.unique(a.counts[a.counts > 0])) == {8}
    assert (a.lowest[a.counts > 0] == 0).all()
    crossing = a.full_mask(scene.shape) & b.full_mask(scene.shape)
    assert crossing.sum() == 10 * 9  # rows 27..36 under A, columns 26..34 under B
    # B rests on A's top (8 voxels) everywhere, a rigid bridge over the substrate.
    assert b.geometry.z0 == pytest.approx(8.0, abs=1e-9)
    assert (b.lowest[b.counts > 0] == 8).all()
    # [8, 14.6) holds centres 8.5 .. 14.5: 7 voxels; the crossing is 8 + 7 thick.
    assert scene.thickness[crossing].tolist() == [15] * 90
    assert scene.top[crossing].tolist() == [15] * 90
    assert (scene.top_label[crossing] == 2).all()


def test_tilted_hexagon_on_a_hexagon_touches_without_entering(small_config) -> None:
    a = WireGeometry((3.1, 30.4), 8.0, 58.0, 13.3, 10.1, "hexagon")
    b = WireGeometry((28.2, 61.3), 85.0, 58.0, 11.9, 8.7, "hexagon", tilt_deg=4.0)
    scene = deposit(small_config(), [a, b])
    wa, wb = scene.wires
    assert wa.geometry.z0 == 0.0 and wb.geometry.z0 > 5.0
    crossing = wa.full_mask(scene.shape) & wb.full_mask(scene.shape)
    top_a = np.zeros(scene.shape, np.int32)
    y0, y1, x0, x1 = wa.box
    top_a[y0:y1, x0:x1] = wa.lowest + wa.counts
    low_b = np.zeros(scene.shape, np.int32)
    y0, y1, x0, x1 = wb.box
    low_b[y0:y1, x0:x1] = wb.lowest
    gaps = low_b[crossing] - top_a[crossing]
    assert gaps.min() == 0  # B's lowest voxel sits directly on A's top somewhere
    assert (gaps >= 0).all()  # and never inside A
    assert np.median(gaps) <= 3  # B lies across A, not perched on an edge


def test_wires_that_cannot_be_seen_or_do_not_fit_are_not_placed(small_config) -> None:
    cfg = small_config(wires={"min_visible_area": 10})
    outside = WireGeometry((-120.0, 30.0), 0.0, 60.0, 8.0, 5.0)
    corner = WireGeometry((-30.0, 1.0), 0.0, 32.0, 4.0, 3.0)  # 2 x 3 px in the field
    too_thick = WireGeometry((5.3, 10.2), 0.0, 50.0, 70.0, 65.0)  # taller than the domain (60)
    ok = WireGeometry((5.3, 50.2), 0.0, 50.0, 6.0, 4.0)
    scene = deposit(cfg, [outside, corner, too_thick, ok])
    assert [w.geometry.start for w in scene.wires] == [ok.start]
    assert scene.dropped == 3
    assert scene.thickness.sum() == scene.wires[0].counts.sum()  # nothing else in the image
    scene = deposit(small_config(wires={"min_visible_area": 6}), [corner])
    assert scene.wires[0].area == 6 and scene.wires[0].truncated


def test_truncated_means_the_footprint_reaches_the_field_border(small_config) -> None:
    inner = WireGeometry((10.2, 20.4), 30.0, 30.0, 6.0, 4.0)
    border = WireGeometry((40.2, 50.4), 0.0, 40.0, 6.0, 4.0)  # runs out at x = 64
    scene = deposit(small_config(), [inner, border])
    assert [w.truncated for w in scene.wires] == [False, True]


def test_drop_hidden_removes_covered_wires_from_image_and_labels(small_config) -> None:
    hidden = WireGeometry((20.3, 32.1), 0.0, 20.0, 6.2, 4.4)
    cover = WireGeometry((10.2, 32.4), 0.0, 40.0, 14.6, 5.1)  # wider and longer, on top
    apart = WireGeometry((57.3, 60.2), 90.0, 50.0, 6.3, 4.2)
    scene = deposit(small_config(), [hidden, cover, apart])
    assert len(scene.wires) == 3 and (scene.top_label == 1).sum() == 0
    kept = drop_hidden(scene, min_visible=5)
    assert [w.geometry.start for w in kept.wires] == [cover.start, apart.start]
    assert kept.dropped == scene.dropped + 1
    expected = np.zeros(scene.shape, np.int32)
    for w in kept.wires:
        y0, y1, x0, x1 = w.box
        expected[y0:y1, x0:x1] += w.counts
    np.testing.assert_array_equal(kept.thickness, expected)
    np.testing.assert_array_equal(kept.top_label == 1, kept.wires[0].full_mask(scene.shape))
    np.testing.assert_array_equal(kept.top_label == 2, kept.wires[1].full_mask(scene.shape))
    # Nothing of the hidden wire remains: the image's material is the kept wires' footprints.
    np.testing.assert_array_equal(kept.top > 0, expected > 0)
    assert drop_hidden(scene, min_visible=0) is scene


def test_same_rng_seed_gives_the_same_scene(small_config) -> None:
    cfg = small_config()
    s1 = generate_scene(cfg, np.random.default_rng(5))
    s2 = generate_scene(cfg, np.random.default_rng(5))
    s3 = generate_scene(cfg, np.random.default_rng(6))
    np.testing.assert_array_equal(s1.thickness, s2.thickness)
    assert [w.geometry for w in s1.wires] == [w.geometry for w in s2.wires]
    assert not np.array_equal(s1.thickness, s3.thickness)
