"""Writes ``particle_stats_pin.npz`` and ``particle_stats_pin.json.gz``: masks and the particle
table and frame summaries ``nanoseg.particle_stats`` gave for them, so that a faster version of
the statistics is held to the same results (``tests/nanoseg/test_particle_stats_pin.py``).

    python tests/nanoseg/data/make_particle_stats_pin.py [--model-frames INSTANCES.pkl]
    python tests/nanoseg/data/make_particle_stats_pin.py --stored-masks   # results only (a deliberate change)

Frames: one generated field per kind of ``benchmarks/bench_measurements.py`` (straight, bent,
tapered, field of view: overlapping and edge-cut wires, widths 12-40 px), hand-made masks (tiny,
one-row, one-column, two-piece, ring, empty), and, with ``--model-frames``, the shipped model's
masks of the daemon benchmark's frames (a pickled list of ``Instances``). Masks are stored
box-local (crops and offsets). Run it with the code whose results are to be kept;
``--stored-masks`` keeps the stored masks (the model's among them) and writes their results anew.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))

from nanoseg.instances import BoxMasks  # noqa: E402
from nanoseg.particle_stats import frame_summary, particle_table  # noqa: E402
from nanoseg.summary_stats import EDGE_RULES  # noqa: E402


def handmade() -> BoxMasks:
    shape = (64, 64)
    masks = np.zeros((8, *shape), bool)
    masks[0, 10, 10] = True  # one pixel
    masks[1, 20, 5:7] = True  # two pixels
    masks[2, 30, 0:40] = True  # one row, touching the edge
    masks[3, 5:50, 60] = True  # one column
    masks[4, 40:44, 10:20] = masks[4, 40:44, 24:34] = True  # two pieces
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 45, xx - 45)
    masks[5] = (r < 12) & (r > 5)  # a ring
    masks[6, 50:64, 0:64] = True  # a band across the frame, cut by three edges
    # 7: empty
    return BoxMasks.from_dense(masks)


def frames(model_frames: Path | None) -> list[tuple[str, BoxMasks, np.ndarray | None, float | None]]:
    from bench_measurements import KINDS, SHAPE, make_fields

    out: list[tuple[str, BoxMasks, np.ndarray | None, float | None]] = []
    for kind in KINDS:
        scene = make_fields(kind, 1, 3)[0]
        dense = np.stack([w.full_mask(SHAPE) for w in scene.wires])
        od = np.random.default_rng(1).random(SHAPE) if kind == "bent" else None
        out.append((kind, BoxMasks.from_dense(dense), od, 8.0))
    out.append(("handmade", handmade(), None, None))
    if model_frames is not None:
        for k, inst in enumerate(pickle.loads(model_frames.read_bytes())):
            out.append((f"model{k}", inst.box_masks, None, 8.0))
    return out


def stored() -> list[tuple[str, BoxMasks, np.ndarray | None, float | None]]:
    """The masks of the stored pin, with their OD images and pixel sizes."""
    pinned = json.loads(gzip.decompress((HERE / "particle_stats_pin.json.gz").read_bytes()))
    out: list[tuple[str, BoxMasks, np.ndarray | None, float | None]] = []
    with np.load(HERE / "particle_stats_pin.npz") as z:
        for name, exp in pinned.items():
            shape = tuple(int(v) for v in z[f"{name}/shape"])
            crops = []
            for i in range(len(z[f"{name}/offsets"])):
                crop_shape = tuple(int(v) for v in z[f"{name}/crop{i}_shape"])
                bits = np.unpackbits(z[f"{name}/crop{i}"], count=int(np.prod(crop_shape)))
                crops.append(bits.astype(bool).reshape(crop_shape))
            od = np.random.default_rng(1).random(shape) if exp["od"] else None
            out.append((name, BoxMasks(shape, z[f"{name}/offsets"], crops), od, exp["pixel_size_nm"]))
    return out


def expected(masks: BoxMasks, od: np.ndarray | None, nm: float | None) -> dict[str, object]:
    table = particle_table(masks, od, nm)  # type: ignore[arg-type]
    lines = [None if c is None else {"points": c.points.tolist(), "width_px": c.width_px.tolist(),
                                     "length_px": c.length_px, "chord_px": c.chord_px}
             for c in table.centrelines]  # fmt: skip
    return {"table": table.to_dict(), "mean_od": None if table.mean_od is None else table.mean_od.tolist(),
            "centrelines": lines, "summaries": {r: frame_summary(table, r).to_dict() for r in EDGE_RULES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-frames", type=Path, default=None)
    ap.add_argument("--stored-masks", action="store_true", help="the stored pin's masks, results written anew")
    args = ap.parse_args()
    arrays: dict[str, np.ndarray] = {}
    results: dict[str, object] = {}
    for name, bm, od, nm in stored() if args.stored_masks else frames(args.model_frames):
        arrays[f"{name}/shape"] = np.array(bm.image_shape)
        arrays[f"{name}/offsets"] = bm.offsets
        for i, c in enumerate(bm.crops):
            arrays[f"{name}/crop{i}"] = np.packbits(c, axis=None)
            arrays[f"{name}/crop{i}_shape"] = np.array(c.shape)
        if od is not None:
            arrays[f"{name}/od_seed"] = np.array(1)
        results[name] = {"pixel_size_nm": nm, "od": od is not None, **expected(bm, od, nm)}
    np.savez_compressed(HERE / "particle_stats_pin.npz", **arrays)
    (HERE / "particle_stats_pin.json.gz").write_bytes(gzip.compress(json.dumps(results, allow_nan=False).encode(), mtime=0))


if __name__ == "__main__":
    main()
