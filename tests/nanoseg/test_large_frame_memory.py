"""Large frames: instance masks stay box-local from the tiles to the RLEs, so memory does not grow
with instances x frame area (an 8000 x 8000 frame with ~2000 instances once asked for 136 GiB; here 648 instances would
need 41 GB).

Measured in a subprocess: its peak resident set (VmHWM) minus its resident set before the work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from nanoseg.instances import BoxMasks, Instances
from nanoseg.masks import encode_box_mask, encode_rle, encode_rle_batch
from nanoseg.particle_stats import particle_table
from nanoseg.postprocess import NestedSuppression, cap_instances, nested_to_drop

SCRIPT = textwrap.dedent("""
    import json, numpy as np
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    from nanoseg.instances import BoxMasks, Instances
    from nanoseg.masks import encode_rle_batch
    from nanoseg.particle_stats import frame_summary, particle_table
    from nanoseg.postprocess import PostprocessConfig, cap_instances, filter_instances
    from nanoseg.prepare import PreparedFrame, instances_to_frame
    from nanoseg.optical_density import InvalidPixels
    from nanoseg.tiling import FrameTiles, plan_tiles
    H = W = 8000
    od = np.zeros((H, W), np.float32)  # the frame's OD image, as the pipeline holds it
    base = rss("VmRSS")
    plan = plan_tiles((H, W), 512, 64)
    per_tile = []
    for k, t in enumerate(plan):  # 2 wires, 60 x 6 px, per tile
        offsets = [(20 + 100 * i, 30 + 5 * (k % 7)) for i in range(2)]
        crops = [np.ones((6, 60), bool)] * 2
        boxes = np.array([(x, y, x + 60, y + 6) for y, x in offsets], np.float32)
        per_tile.append(Instances(boxes, np.linspace(0.9, 0.6, 2), BoxMasks((512, 512), offsets, crops)))
    gray = np.broadcast_to(np.float32(0), (H, W))  # the plan's image, never read here: no memory
    prepared = PreparedFrame(FrameTiles(gray, tuple(plan)), (H, W), od, "optical_density", InvalidPixels(), None, 0.5)
    post = PostprocessConfig(max_instances=500)
    merged = instances_to_frame(per_tile, prepared)
    inst, capped = cap_instances(merged, post.max_instances)
    inst = filter_instances(inst, post)
    table = particle_table(inst.box_masks, od, 10.0)
    rles = encode_rle_batch(inst.box_masks)
    print(json.dumps({"tiles": len(plan), "merged": len(merged), "capped": capped, "kept": len(inst),
                      "rows": len(table), "rle_size": rles[0]["size"],
                      "growth_bytes": rss("VmHWM") - base}))
""")


def test_an_8000_px_frame_with_hundreds_of_instances_stays_box_local() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["tiles"] == 324 and r["merged"] == 324 * 2  # 18 x 18 tiles, no wire crosses a border
    assert r["capped"] == 324 * 2 - 500 and r["kept"] == r["rows"] == 500
    assert r["rle_size"] == [8000, 8000]
    # dense (N, H, W) masks: 500 x 64 MB; box-local: the full-frame coverage count (256 MB) and crops
    assert r["growth_bytes"] < 1.0e9, r


def test_box_masks_answer_like_the_dense_stack() -> None:
    rng = np.random.default_rng(5)
    dense = np.zeros((6, 40, 50), bool)
    for i in range(5):  # the last mask stays empty
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        dense[i, y:y + rng.integers(2, 10), x:x + rng.integers(2, 10)] = rng.random() < 2
        dense[i] &= rng.random((40, 50)) < 0.8
    bm = BoxMasks.from_dense(dense)
    np.testing.assert_array_equal(np.asarray(bm), dense)
    np.testing.assert_array_equal(bm.sum(axis=0, dtype=np.int32), dense.sum(axis=0, dtype=np.int32))
    np.testing.assert_array_equal(bm.sum(axis=(1, 2)), dense.sum(axis=(1, 2)))
    np.testing.assert_array_equal(bm[2], dense[2])
    np.testing.assert_array_equal(bm[3, 5:30, 7:44], dense[3, 5:30, 7:44])
    np.testing.assert_array_equal(np.asarray(bm[np.array([4, 0])]), dense[[4, 0]])
    inst = Instances(np.zeros((6, 4)), np.zeros(6), bm)
    assert inst.masks.shape == (6, 40, 50) and inst.box_masks is bm
    a, b = particle_table(bm, None, 2.0), particle_table(dense, None, 2.0)  # type: ignore[arg-type]
    for name, col in a.columns().items():
        np.testing.assert_array_equal(col, b.columns()[name], err_msg=name)
    assert encode_rle_batch(bm) == encode_rle_batch(dense)


def test_box_local_rle_equals_the_dense_encoding() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        hc, wc = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
        y, x = int(rng.integers(0, h - hc + 1)), int(rng.integers(0, w - wc + 1))
        crop = rng.random((hc, wc)) < rng.random()
        full = np.zeros((h, w), bool)
        full[y:y + hc, x:x + wc] = crop
        assert encode_box_mask(crop, (y, x), (h, w)) == encode_rle(full)


def test_nested_suppression_on_box_masks_matches_the_dense_rule() -> None:
    rng = np.random.default_rng(2)
    dense = np.zeros((12, 64, 64), bool)
    for i in range(0, 12, 2):  # pairs: a square, and a smaller one partly or wholly inside it
        y, x, s = rng.integers(0, 44), rng.integers(0, 44), rng.integers(8, 20)
        dense[i, y:y + s, x:x + s] = True
        dy, dx, t = rng.integers(0, s // 2), rng.integers(-4, s // 2), rng.integers(2, s // 2 + 1)
        dense[i + 1, y + dy:y + dy + t, max(x + dx, 0):x + dx + t] = True
    cfg = NestedSuppression()
    flat = dense.reshape(12, -1).astype(np.float64)
    areas, inter = flat.sum(1), flat @ flat.T
    expected = np.array([any(i != j and areas[i] <= cfg.max_area_ratio * areas[j]
                             and inter[i, j] >= cfg.containment * areas[i] for j in range(12)) for i in range(12)])
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(nested_to_drop(BoxMasks.from_dense(dense), cfg), expected)


def test_cap_keeps_the_highest_scores_in_order() -> None:
    inst = Instances(np.zeros((4, 4)), np.array([0.2, 0.9, 0.5, 0.7]), np.zeros((4, 3, 3), bool))
    kept, dropped = cap_instances(inst, 2)
    assert dropped == 2 and kept.scores.tolist() == [np.float32(0.9), np.float32(0.7)]
    assert cap_instances(inst, 4)[1] == 0
