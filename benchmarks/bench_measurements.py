"""Particle measurements against the generator's truth: ground-truth masks, then the whole chain.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_measurements.py [--images 24]
        [--model-images 21] [--model models/default/model.pt] [--engine torch|onnx]
        [--threads 1] [--seed 0] [--baseline OLD_particle_stats.py | --baseline-rev REV] [--out results.json]
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_measurements.py --statistics-cost \
        --baseline-rev REV [--model-frames 8] [--timing-repeats 15] [--out cost.json]

Scenes: 512 x 512 fields at the paper preset's scale (8 nm per pixel), ``--images`` per kind,
wires deposited through the generator's ``deposit()`` with rectangular cross-sections, lengths
log-uniform in 80..400 px, widths log-uniform in 12..40 px, random angles:

- straight, bent (parabolic bow, sagitta 5-15 % of the length), tapered (end width 50-80 % of
  the start): 10 wires per field, each wholly inside it (wires may overlap: every wire's own
  footprint, the amodal mask, is what is measured);
- field: 30 straight wires drawn with centres uniform over the field and a margin of half the
  longest wire (those that miss the field are not deposited), so the frame cuts wires as a
  microscope's field of view does (truth: the visible
  part of the axis; the counting rules are scored against the mean length of whole wires).

Truth: ``centreline_length`` (arc length of the bent axis) and ``mean_width`` (footprint area /
centreline length) of each ``WireGeometry``. Errors: length |measured / true - 1|, width and
MinFeret |measured - true| px, MinFeret against the width of straight wires.

Whole chain: the fields rendered as the paper preset renders (optical density, blur 2 px, 8-bit),
segmented by the shipped model on the CPU (``Segmenter.segment_gray``), predicted masks matched to
the ground-truth footprints at mask IoU >= 0.5 and measured. Statistics time: particle table and
frame summary (1 000 bootstrap resamples) of the model's masks, per frame, against that frame's
segmentation time in the same process; and of a 20-wire frame, interleaved with ``--baseline``
(an earlier ``particle_stats.py``) so both see the same machine load.

``--statistics-cost``: only the statistics' cost per frame, this version against ``--baseline-rev``,
interleaved, on the frames the daemon's benchmark analyses: the null engine's six rods on 128 x 128
and 512 x 512 frames, and the shipped model's masks (ONNX Runtime) of ``--model-frames`` generated
512 x 512 frames (``bench_common.synthetic_frame``); each frame's particle table (with its optical
density) and summary (1 000 resamples), CPU time of this process (steadier than wall time on a
shared machine), and whether both versions' results are the same to the last bit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # a script beside its helper
    DEFAULT_MODEL,
    machine_facts,
    print_table,
    write_json,
)

from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg.summary_stats import EDGE_RULES, edge_weights, weighted_stats

SHAPE = (512, 512)
KINDS = ("straight", "bent", "tapered", "field")
MAX_LENGTH = 400.0


def scene_config() -> Any:
    from nanoseg.config_io import load_yaml
    from nanoseg.paths import resolve_config
    from nanoseg_training.synthetic_config import SceneConfig

    cfg = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    return cfg.model_copy(update={"wires": cfg.wires.model_copy(update={"min_visible_area": 20})})


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def geometries(kind: str, rng: np.random.Generator) -> list[Any]:
    """The wires of one field of ``kind`` (see the module)."""
    from nanoseg_training.wire_geometry import WireGeometry

    out: list[Any] = []
    n = 30 if kind == "field" else 10  # most field draws miss the frame
    while len(out) < n:
        length, width = _loguniform(rng, 80, MAX_LENGTH), _loguniform(rng, 12, 40)
        angle = float(rng.uniform(0, 180))
        sag = float(rng.uniform(0.05, 0.15) * length * rng.choice([-1, 1])) if kind == "bent" else 0.0
        taper = float(rng.uniform(0.2, 0.5)) if kind == "tapered" else 0.0
        ux, uy = math.cos(math.radians(angle)), -math.sin(math.radians(angle))
        half = 0.5 * length * max(abs(ux), abs(uy)) + width + abs(sag)
        if kind == "field":  # the same region for every length: a stationary deposit
            cx, cy = rng.uniform(-MAX_LENGTH / 2, SHAPE[1] + MAX_LENGTH / 2, 2)
        else:
            if 2 * half >= min(SHAPE) - 4:
                continue
            cx, cy = rng.uniform(half + 2, SHAPE[1] - half - 2, 2)
        thickness = width * float(rng.uniform(0.5, 1.0))
        out.append(WireGeometry(start=(cx - length / 2 * ux, cy - length / 2 * uy), angle_deg=angle, length=length,
                                width=width, thickness=thickness, sagitta=sag, taper=taper))
    return out


def visible_length(g: Any, shape: tuple[int, int]) -> float:
    """Length of a straight wire's axis inside the frame [0, W] x [0, H] (Liang-Barsky clip)."""
    (x0, y0), (x1, y1) = g.start, g.end
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0), (dx, shape[1] - x0), (-dy, y0), (dy, shape[0] - y0)):
        if p == 0:
            if q < 0:
                return 0.0
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    return max(0.0, t1 - t0) * g.length


def make_fields(kind: str, n: int, seed: int) -> list[Any]:
    from nanoseg_training.scene import deposit

    cfg = scene_config()
    rng = np.random.default_rng(np.random.SeedSequence([seed, KINDS.index(kind)]))
    return [deposit(cfg, geometries(kind, rng)) for _ in range(n)]


def truth_of(scene: Any, kind: str) -> dict[str, np.ndarray]:
    from nanoseg_training.wire_geometry import centreline_length, mean_width

    gs = [w.geometry for w in scene.wires]
    cut = np.array([w.truncated for w in scene.wires], dtype=bool)
    length = np.array([centreline_length(g) for g in gs])
    visible = np.array([visible_length(g, SHAPE) for g in gs]) if kind == "field" else length
    return {"length": length, "visible_length": visible, "width": np.array([mean_width(g) for g in gs]),
            "nominal_width": np.array([g.width for g in gs]), "sagitta": np.array([abs(g.sagitta) for g in gs]),
            "cut": cut}


def errors(table: Any, truth: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    true_len = truth["visible_length"]
    ok = true_len > 3 * truth["width"]  # a sliver of a cut wire has no length to speak of
    ok &= table.area_px > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(table.length_px / true_len - 1)
        major_rel = np.abs(np.sqrt(3) / 2 * table.major_px / true_len - 1)
    out = {
        "length_rel": rel[ok],
        "width_abs": np.abs(table.width_px - truth["width"])[ok & ~truth["cut"]],
        "major_length_rel": major_rel[ok],
    }
    if kind in ("straight", "field"):
        inside = ok & ~truth["cut"]
        out["min_feret_abs"] = np.abs(table.min_feret_px - truth["nominal_width"])[inside]
    return out


def ground_truth_masks(fields: dict[str, list[Any]]) -> dict[str, Any]:
    rows, result = [], {}
    for kind, scenes in fields.items():
        acc: dict[str, list[np.ndarray]] = {}
        t_stats = []
        for scene in scenes:
            masks = np.stack([w.full_mask(SHAPE) for w in scene.wires])
            t0 = time.perf_counter()
            table = particle_table(masks, None, 8.0)
            frame_summary(table)
            t_stats.append(time.perf_counter() - t0)
            for k, v in errors(table, truth_of(scene, kind), kind).items():
                acc.setdefault(k, []).append(v)
        e = {k: np.concatenate(v) for k, v in acc.items()}
        res: dict[str, Any] = {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                                   "n": int(v.size)} for k, v in e.items()}  # fmt: skip
        res["stats_ms_per_frame"] = 1000 * float(np.median(t_stats))
        result[kind] = res
        mf = res.get("min_feret_abs")
        rows.append([kind, res["length_rel"]["n"], 100 * res["length_rel"]["median"], 100 * res["length_rel"]["p90"],
                     100 * res["major_length_rel"]["median"], res["width_abs"]["median"], res["width_abs"]["p90"],
                     "-" if mf is None else f"{mf['median']:.2f} / {mf['p90']:.2f}"])
    print_table("Ground-truth masks: measured against the generator's geometry",
                ["set", "wires", "length err % (median)", "p90", "2nd-moment length err %", "width err px (median)",
                 "p90", "MinFeret - width px (median / p90)"], rows)  # fmt: skip
    return result


def counting_rules(scenes: list[Any]) -> dict[str, Any]:
    """Pooled mean length of the field set under each rule, against whole wires' true mean."""
    lengths: dict[str, list[np.ndarray]] = {r: [] for r in EDGE_RULES}
    weights: dict[str, list[np.ndarray]] = {r: [] for r in EDGE_RULES}
    drawn: list[float] = []
    for scene in scenes:
        masks = np.stack([w.full_mask(SHAPE) for w in scene.wires])
        t = particle_table(masks)
        drawn.extend(w.geometry.length for w in scene.wires)
        for rule in EDGE_RULES:
            w = edge_weights(rule, t.touches_edge, t.bbox_width_px, t.bbox_height_px, SHAPE)
            lengths[rule].append(t.length_px)
            weights[rule].append(w)
    # the deposited wires are seen in proportion to how likely a field is to catch them; the
    # population of whole wires is the drawn one: log-uniform 80..400 px
    true_mean = (MAX_LENGTH - 80) / math.log(MAX_LENGTH / 80)
    out: dict[str, Any] = {"true_mean_length_px": true_mean}
    rows = []
    for rule in EDGE_RULES:
        x, w = np.concatenate(lengths[rule]), np.concatenate(weights[rule])
        ok = w > 0
        mean = float(weighted_stats(x[ok], w[ok])[0])
        out[rule] = {"mean_length_px": mean, "bias_percent": 100 * (mean / true_mean - 1), "counted": int(ok.sum())}
        rows.append([rule, int(ok.sum()), mean, 100 * (mean / true_mean - 1)])
    print_table(f"Counting rules, field set ({len(scenes)} fields): mean length vs whole wires' {true_mean:.1f} px",
                ["rule", "particles counted", "mean length px", "bias %"], rows)
    return out


def match(pred: np.ndarray, gt: np.ndarray, min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of predicted to ground-truth masks by IoU."""
    if len(pred) == 0 or len(gt) == 0:
        return []
    p = pred.reshape(len(pred), -1).astype(np.float32)
    g = gt.reshape(len(gt), -1).astype(np.float32)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    pairs: list[tuple[int, int]] = []
    while True:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] < min_iou:
            return pairs
        pairs.append((int(i), int(j)))
        iou[i, :] = -1
        iou[:, j] = -1


def model_chain(fields: dict[str, list[Any]], args: argparse.Namespace) -> dict[str, Any]:
    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.engines.factory import engine_from_checkpoint
    from nanoseg.postprocess import PostprocessConfig
    from nanoseg.segmenter import Segmenter
    from nanoseg_training.rendering import render

    ckpt = load_checkpoint(args.model)
    engine = engine_from_checkpoint(ckpt, args.engine, "cpu", args.threads)
    seg = Segmenter.for_checkpoint(engine, ckpt, PostprocessConfig())
    per_kind = max(1, args.model_images // 3)
    rows: list[list[Any]] = []
    result: dict[str, Any] = {}
    seg_s, stats_s, wires_per_frame = [], [], []
    seg.segment_gray(render(fields["straight"][0], np.random.default_rng(0)).gray)  # warm-up
    for kind in ("straight", "bent", "tapered"):
        acc: dict[str, list[np.ndarray]] = {}
        detected = total = 0
        for k, scene in enumerate(fields[kind][:per_kind]):
            gray = render(scene, np.random.default_rng([args.seed, k])).gray
            t0 = time.perf_counter()
            inst = seg.segment_gray(gray)
            t1 = time.perf_counter()
            table = particle_table(inst.masks, None, 8.0)
            frame_summary(table)
            t2 = time.perf_counter()
            seg_s.append(t1 - t0)
            stats_s.append(t2 - t1)
            wires_per_frame.append(len(inst))
            gt = np.stack([w.full_mask(SHAPE) for w in scene.wires])
            truth = truth_of(scene, kind)
            pairs = match(inst.masks, gt)
            total += len(gt)
            detected += len(pairs)
            if not pairs:
                continue
            pi, gi = (np.array(v) for v in zip(*pairs))
            alone = ~table.overlapped[pi]
            acc.setdefault("length_rel", []).append(np.abs(table.length_px[pi] / truth["length"][gi] - 1))
            acc.setdefault("width_abs", []).append(np.abs(table.width_px[pi] - truth["width"][gi]))
            acc.setdefault("length_rel_alone", []).append(np.abs(table.length_px[pi] / truth["length"][gi] - 1)[alone])
            if kind == "straight":
                mf_err = np.abs(table.min_feret_px[pi] - truth["nominal_width"][gi])
                acc.setdefault("min_feret_abs", []).append(mf_err)
                acc.setdefault("min_feret_abs_alone", []).append(mf_err[alone])
        e = {k: np.concatenate(v) for k, v in acc.items()}
        res: dict[str, Any] = {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                                   "n": int(v.size)} for k, v in e.items() if v.size}  # fmt: skip
        res["detected"], res["wires"] = detected, total
        result[kind] = res
        la = res.get("length_rel_alone", {"median": math.nan})
        mf, mfa = res.get("min_feret_abs"), res.get("min_feret_abs_alone")
        rows.append([kind, f"{detected}/{total}", 100 * res["length_rel"]["median"], 100 * res["length_rel"]["p90"],
                     100 * la["median"], res["width_abs"]["median"], res["width_abs"]["p90"],
                     "-" if mf is None else f"{mf['median']:.2f} / {mf['p90']:.2f}",
                     "-" if mfa is None else f"{mfa['median']:.2f} ({mfa['n']})"])
    print_table(f"Whole chain: the shipped model's masks ({args.engine}, {args.threads} thread(s)), matched at IoU >= 0.5",
                ["set", "matched", "length err % (median)", "p90", "not overlapped: median %", "width err px (median)",
                 "p90", "MinFeret - width px (median / p90)", "not overlapped: median (n)"], rows)  # fmt: skip
    dense = twenty_wire_scene(args.seed)
    gray = render(dense, np.random.default_rng(args.seed)).gray
    dense_seg, dense_stats, dense_n = [], [], 0
    for _ in range(args.timing_repeats // 2 or 1):  # the 20-wire frame: segmentation, then statistics
        t0 = time.perf_counter()
        inst = seg.segment_gray(gray)
        t1 = time.perf_counter()
        frame_summary(particle_table(inst.masks, None, 8.0))
        dense_seg.append(t1 - t0)
        dense_stats.append(time.perf_counter() - t1)
        dense_n = len(inst)
    result["timing_20_wires"] = {
        "segment_ms_median": 1000 * float(np.median(dense_seg)), "statistics_ms_median": 1000 * float(np.median(dense_stats)),
        "statistics_over_segment_median": float(np.median(np.array(dense_stats) / np.array(dense_seg))),
        "particles": dense_n}  # fmt: skip
    d = result["timing_20_wires"]
    print(f"\n20-wire frame ({dense_n} particles found): segmentation {d['segment_ms_median']:.0f} ms, statistics "
          f"{d['statistics_ms_median']:.1f} ms ({100 * d['statistics_over_segment_median']:.1f} %)")
    ratio = float(np.median(np.array(stats_s) / np.array(seg_s)))
    result["timing"] = {"segment_ms_median": 1000 * float(np.median(seg_s)),
                        "statistics_ms_median": 1000 * float(np.median(stats_s)),
                        "statistics_over_segment_median": ratio,
                        "particles_per_frame_median": float(np.median(wires_per_frame))}  # fmt: skip
    print(f"\nper frame: segmentation {result['timing']['segment_ms_median']:.0f} ms, statistics "
          f"{result['timing']['statistics_ms_median']:.1f} ms ({100 * ratio:.1f} % of the segmentation), "
          f"{result['timing']['particles_per_frame_median']:.0f} particles")
    return result


def baseline_from_revision(rev: str, workdir: Path) -> Path:
    """The statistics of git revision ``rev`` (``particle_stats`` and the modules it builds on that
    exist there) written under ``workdir`` as modules importing each other, not the working
    tree's; returns the ``particle_stats`` file for ``load_baseline``."""
    import subprocess

    names = ("particle_geometry", "particle_outline", "particle_skeleton", "summary_stats", "particle_stats")
    sys.path.insert(0, str(workdir))
    texts = {}
    for name in names:
        shown = subprocess.run(["git", "show", f"{rev}:nanoseg/{name}.py"], capture_output=True, text=True)
        if shown.returncode == 0:  # a module the revision has
            texts[name] = shown.stdout
    for name, text in texts.items():
        for other in texts:
            text = text.replace(f"from nanoseg.{other} import", f"from baseline_{other} import")
        (workdir / f"baseline_{name}.py").write_text(text)
    return workdir / "baseline_particle_stats.py"


def load_baseline(path: Path) -> Any:
    """A module file with ``particle_table`` and ``frame_summary`` (e.g. an earlier version's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_particle_stats", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def twenty_wire_scene(seed: int) -> Any:
    """A realistic dense frame: the 10 straight and 10 bent wires of two fields deposited together."""
    from nanoseg_training.scene import deposit

    rng = {k: np.random.default_rng(np.random.SeedSequence([seed + 100, KINDS.index(k)])) for k in ("straight", "bent")}
    return deposit(scene_config(), geometries("straight", rng["straight"]) + geometries("bent", rng["bent"]))


def stats_timing(seed: int, repeats: int, baseline: Path | None) -> dict[str, Any]:
    """Statistics of a realistic frame, 20 wires (10 straight, 10 bent), ground-truth masks; with
    ``baseline``, that module's statistics of the same frame, interleaved (the same machine load)."""
    masks = np.stack([w.full_mask(SHAPE) for w in twenty_wire_scene(seed).wires])
    impls = {"this": (particle_table, frame_summary)}
    if baseline is not None:
        mod = load_baseline(baseline)
        impls["baseline"] = (mod.particle_table, mod.frame_summary)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(repeats):
        for name, (table_of, summary_of) in impls.items():
            t0 = time.perf_counter()
            summary_of(table_of(masks, None, 8.0))
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"particles": len(masks), **{f"{k}_ms_median": 1000 * float(np.median(v)) for k, v in times.items()}}
    line = f"\nstatistics (table and summary) of a {len(masks)}-wire 512 x 512 frame: {out['this_ms_median']:.1f} ms"
    if baseline is not None:
        out["this_over_baseline"] = float(np.median(np.array(times["this"]) / np.array(times["baseline"])))
        line += f", baseline {out['baseline_ms_median']:.1f} ms, ratio {out['this_over_baseline']:.2f} (median of {repeats} pairs)"
    print(line)
    return out


def cost_frames(args: argparse.Namespace) -> dict[str, list[tuple[Any, np.ndarray]]]:
    """The daemon benchmark's frames as (box masks, optical density) per set (``--statistics-cost``)."""
    from bench_common import DOSE, synthetic_frame

    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.engines.factory import engine_from_checkpoint
    from nanoseg.engines.null_engine import NullEngine
    from nanoseg.frame_profile import FrameProfile, ScalarI0
    from nanoseg.postprocess import PostprocessConfig
    from nanoseg.segmenter import Segmenter

    ckpt = load_checkpoint(args.model)
    profile = FrameProfile(name="bench", mode="optical_density", i0=ScalarI0(policy="scalar", value=DOSE),
                           pixel_size_nm=8.0)
    base = synthetic_frame(11, 0).counts
    size = int(ckpt.input_spec["size"])
    null = Segmenter.for_checkpoint(NullEngine((1, size, size)), ckpt, PostprocessConfig())
    sets: dict[str, list[tuple[Any, np.ndarray]]] = {}
    for side in (128, 512):
        prepared = null.prepare(np.ascontiguousarray(base[:side, :side]), profile)
        sets[f"null engine, {side} x {side}"] = [(null.analyse(prepared, 8.0).instances.box_masks, prepared.image)]
    engine = engine_from_checkpoint(ckpt, args.engine, "cpu", args.threads)
    model = Segmenter.for_checkpoint(engine, ckpt, PostprocessConfig())
    frames = []
    for i in range(args.model_frames):
        prepared = model.prepare(synthetic_frame(11, i).counts, profile)
        frames.append((model.analyse(prepared, 8.0).instances.box_masks, prepared.image))
    sets[f"shipped model, 512 x 512 ({args.model_frames} frames)"] = frames
    return sets


def statistics_cost(args: argparse.Namespace) -> dict[str, Any]:
    """CPU ms per frame of table + summary, this version against the baseline, interleaved."""
    import json

    if args.baseline is None:
        raise SystemExit("--statistics-cost needs --baseline-rev (or --baseline)")
    mod = load_baseline(args.baseline)
    impls = {"this": (particle_table, frame_summary), "baseline": (mod.particle_table, mod.frame_summary)}

    def result(impl: str, masks: Any, od: np.ndarray) -> str:
        table = impls[impl][0](masks, od, 8.0)
        lines = [None if c is None else (c.points.tolist(), c.width_px.tolist(), c.length_px)
                 for c in table.centrelines]  # fmt: skip
        return json.dumps([table.to_dict(), table.mean_od.tolist(), lines,
                           {r: impls[impl][1](table, r).to_dict() for r in EDGE_RULES}])

    out: dict[str, Any] = {}
    rows = []
    for name, frames in cost_frames(args).items():
        same = all(result("this", m, od) == result("baseline", m, od) for m, od in frames)
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(args.timing_repeats):
            for k, (table_of, summary_of) in impls.items():
                t0 = time.process_time()
                for masks, od in frames:
                    summary_of(table_of(masks, od, 8.0))
                times[k].append((time.process_time() - t0) / len(frames))
        t, b = np.array(times["this"]), np.array(times["baseline"])
        particles = float(np.mean([len(m) for m, _ in frames]))
        out[name] = {"particles_per_frame": particles, "same_results": same,
                     "baseline_ms_min": 1000 * b.min(), "baseline_ms_median": 1000 * float(np.median(b)),
                     "this_ms_min": 1000 * t.min(), "this_ms_median": 1000 * float(np.median(t)),
                     "speedup_median_of_pairs": float(np.median(b / t))}  # fmt: skip
        rows.append([name, particles, f"{1000 * b.min():.2f} / {1000 * np.median(b):.2f}",
                     f"{1000 * t.min():.2f} / {1000 * np.median(t):.2f}", f"{np.median(b / t):.2f}x", same])
    print_table(f"Statistics per frame (table + summary), CPU ms, min / median of {args.timing_repeats}",
                ["frames", "particles", "baseline", "this", "speed-up (median of pairs)", "same results"], rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="fields per set for the ground-truth masks")
    ap.add_argument("--model-images", type=int, default=21, help="fields through the model (split over 3 sets); 0: skip")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--engine", choices=["torch", "onnx", "onnxruntime"], default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-repeats", type=int, default=10)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a particle_stats.py to time against (git show REV:nanoseg/particle_stats.py > FILE)")
    ap.add_argument("--baseline-rev", default=None,
                    help="time against the statistics of this git revision (all three modules; instead of --baseline)")
    ap.add_argument("--statistics-cost", action="store_true",
                    help="only the statistics' cost per frame against --baseline-rev (module docstring)")
    ap.add_argument("--model-frames", type=int, default=8, help="--statistics-cost: generated frames through the model")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    args.engine = "onnxruntime" if args.engine == "onnx" else args.engine  # the engine factory's name
    if args.baseline_rev:
        import tempfile

        args.baseline = baseline_from_revision(args.baseline_rev, Path(tempfile.mkdtemp(prefix="bench_baseline_")))
    out: dict[str, Any] = {"machine": machine_facts(), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.statistics_cost:
        out["statistics_cost"] = statistics_cost(args)
        write_json(args.out, out)
        return
    fields = {kind: make_fields(kind, args.images, args.seed) for kind in KINDS}
    out["ground_truth_masks"] = ground_truth_masks(fields)
    out["counting_rules"] = counting_rules(fields["field"])
    out["statistics_timing"] = stats_timing(args.seed, args.timing_repeats, args.baseline)
    if args.model_images > 0:
        out["model_chain"] = model_chain(fields, args)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
