"""``nanoseg models release RUN_DIR --out models/default``: ship a trained run with its model card.

Steps: the run's weights become a float16-stored nanoseg checkpoint (``model.pt``, half the size,
run in float32), evaluated on a held-out synthetic test set (``metrics.json``, ``report.md``,
figures), run on the real ptychography image when given (``real_overlay.png``), and described in
``MODEL_CARD.md`` (architecture, input spec, training config, data seeds, command, wall time,
metrics). Everything in the card is measured here; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from nanoseg.checkpoint import load_checkpoint, save_checkpoint
from nanoseg.mask_decoding import MaskDecoding
from nanoseg.model import ModelConfig, count_parameters, describe
from nanoseg_training.train import checkpoint_from_run, lineage


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(m: dict[str, Any], key: str) -> str:
    row = m[key]
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    return " | ".join("—" if row.get(c) is None else f"{row[c]:.1f}" for c in cols)


def operating_point_text(ckpt_meta: dict[str, Any]) -> str:
    """The card's sentence on the thresholds that accuracy, counts and statistics are measured at."""
    op = ckpt_meta.get("operating_point")
    if not op:
        return "Accuracy, counts and statistics at the default operating point (score >= 0.5, mask >= 0.5)."
    score = "class score x maskness" if op.get("mask_rescoring") else "score"
    dec = MaskDecoding.model_validate(op.get("mask_decoding") or {})
    how = "" if dec.is_plain else f"; {dec.describe()}"
    return (f"Accuracy, counts and statistics at the model's operating point ({score} >= {op['score_threshold']}, "
            f"mask >= {op['mask_threshold']}{how}), chosen by `nanoseg calibrate` on `{op['chosen_on']}` "
            f"({op['objective']} {op['value']}; see `calibration/calibration.md`). The daemon uses it unless "
            "its config sets the thresholds.")


def made_by(dataset: Path) -> str:
    """How a COCO data set was made, from its ``info`` (``nanoseg generate`` writes preset, count, seed)."""
    try:
        info = json.loads((dataset / "annotations.json").read_text()).get("info", {})
    except (OSError, ValueError):
        info = {}
    preset = info.get("preset") or str(info.get("description", "")).rpartition("preset ")[2]
    if info.get("generator") != "nanoseg_training.coco_dataset" or not preset:
        return "not made by `nanoseg generate`"
    return f"`nanoseg generate {preset} --count {info.get('count')} --seed {info.get('seed')}`"


def lineage_text(ckpt_meta: dict[str, Any]) -> str:
    """The card's table of every training run behind the weights, oldest first (empty for one run)."""
    runs = lineage(ckpt_meta)
    if len(runs) < 2:
        return ""

    def data(r: dict[str, Any]) -> str:
        return " + ".join(f"`{d['preset']}` {d['count']}, seed {d['seed']}" if d else "given"
                          for d in [r.get("data"), *(r.get("mix") or [])])

    def start(i: int, r: dict[str, Any]) -> str:
        return "from scratch" if not r.get("init_from") else f"run {i - 1}" if i > 1 else f"`{r['init_from']}`"

    rows = "\n".join(
        f"| {i} | `{r['name']}` | {start(i, r)} | {r['iterations']} | "
        f"{(r['iterations'] or 0) * (r['batch_size'] or 0)} | {data(r)} | {(r.get('train_seconds') or 0):.0f} s | "
        f"{r.get('train_device') or 'unknown'} | {('`' + r['sha256'][:12] + '`') if r.get('sha256') else 'this model'} |"
        for i, r in enumerate(runs, 1))
    its = sum(r["iterations"] or 0 for r in runs)
    images = sum((r["iterations"] or 0) * (r["batch_size"] or 0) for r in runs)
    seconds = sum(r.get("train_seconds") or 0 for r in runs)
    return f"""- Lineage: {len(runs)} runs, each starting from the weights the one before it ended with
  (`meta.lineage` in the checkpoint; sha256 of each run's weights): {its} iterations, {images} images,
  {seconds / 3600:.2f} h of training in all.

| run | config | start | iterations | images | data | training time | device | weights |
|---|---|---|---|---|---|---|---|---|
{rows}
"""


def tta_text(tta: tuple[int, dict[str, Any]] | None, model: str, seconds_per_image: float) -> str:
    """The card's paragraph on the same test set with mask TTA (empty without);
    ``seconds_per_image``: the evaluation's time per image without it."""
    if tta is None:
        return ""
    n, m = tta
    return (f"\nWith mask TTA over {n} views (`nanoseg evaluate {model} <test set> --out <dir> --mask-tta {n}`; "
            f"the backbone runs {n} times: {m['run']['inference_seconds_per_image']:.2f} s per image against "
            f"{seconds_per_image:.2f} s in this evaluation, so not what the daemon runs unless `model.mask_tta` "
            "asks for it): "
            f"mask AP **{m['segm']['AP']:.1f}** (AP50 {m['segm']['AP50']:.1f}, AP75 {m['segm']['AP75']:.1f}), "
            f"box AP {m['bbox']['AP']:.1f}, foreground accuracy {m['accuracy']['foreground']:.3f}, count error "
            f"{m['count']['mean_absolute']:.2f} per image (`evaluation_tta{n}/`).\n")


def refiner_text(ckpt_meta: dict[str, Any], model_cfg: ModelConfig) -> str:
    """The card's lines on the mask refiner (empty without one)."""
    ref = model_cfg.mask_refiner
    info = ckpt_meta.get("mask_refiner")
    if ref is None or not info:
        return ""
    tc = info["config"]
    gen = tc.get("generate") or {}
    data = (f"`nanoseg generate {gen['preset']} --count {gen['count']} --seed {gen['seed']}`" if gen
            else f"`{tc['data']}`")
    last = info["history"][-1]
    return f"""
- Mask refiner (`nanoseg.mask_refiner`, {ref.channels} channels, dilations {list(ref.dilations)}):
  trained after the network, which it leaves unchanged, by `nanoseg train-refiner
  configs/training/{tc['name']}.yaml --model <the network>` on the network's own detections on
  {data} (not its training images; the last {tc['holdout_images']} images held out):
  {info['samples']} detections, {tc['epochs']} epochs, {last.get('seconds', 0):.0f} s on the CPU. Held-out mean
  mask IoU of matched detections {info['holdout_iou_coarse']:.4f} (the mask head's masks) ->
  {info['holdout_iou']:.4f} (refined).
"""


def real_set_text(real_set: str, profile: str, max_detections: int | None,
                  runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The card's standing "real data" table: mask AP (and AP50, box AP) of a real annotated set,
    overall and per image group (e.g. ``contrast``), one row per pixel-size setting."""
    if not runs:
        return ""
    groups = [(attr, value) for attr, values in runs[0][1].get("groups", {}).items() for value in values]
    head = " | ".join(f"{attr} {value}" for attr, value in groups)
    lines = [f"Annotated real images `{real_set}` ({runs[0][1]['images']} images), prepared by profile "
             f"`{profile}`{f', up to {max_detections} detections per model input' if max_detections else ''}; "
             "mask AP (x100) overall and per group, box AP overall. Reproduce with `nanoseg evaluate "
             f"<model> <real set> --profile {profile} --pixel-size <setting>"
             f"{f' --max-detections {max_detections}' if max_detections else ''} --out <dir>`.", "",
             f"| pixel size | mask AP | mask AP50 | {head + ' | ' if head else ''}box AP |",
             "|---" * (4 + len(groups)) + "|"]
    for setting, m in runs:
        per = " | ".join(_ap(m.get("groups", {}).get(attr, {}).get(value, {}).get("segm", {}).get("AP"))
                         for attr, value in groups)
        lines.append(f"| {setting} | {_ap(m['segm']['AP'])} | {_ap(m['segm']['AP50'])} | "
                     f"{per + ' | ' if per else ''}{_ap(m['bbox']['AP'])} |")
    return "\n".join(lines) + "\n"


def _ap(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def card_text(ckpt_meta: dict[str, Any], model_cfg: ModelConfig, metrics: dict[str, Any], args: argparse.Namespace,
              size_mb: float, params: int, real: bool, tta: tuple[int, dict[str, Any]] | None = None,
              real_table: str = "") -> str:
    tc = ckpt_meta["train_config"]
    cfg = model_cfg.model_dump(mode="json")
    arch = describe(model_cfg)
    gen = tc["data"].get("generate") or {}
    mix = "".join(f"; mixed with `{m['train']}` (weight {m['weight']} against {tc['data'].get('weight', 1.0)})"
                  for m in tc["data"].get("mix") or [])
    acc = metrics["accuracy"]
    stats = metrics["statistics"]
    stat_rows = "\n".join(
        f"| {k} | {v['gt_mean']:.2f} | {v['pred_mean']:.2f} | {v['wasserstein']:.3f} |" for k, v in stats.items()
    )
    head = 2 * model_cfg.mask_roi_size
    refined = "" if model_cfg.mask_refiner is None else (
        f", refined from the image to {arch['mask_resolution']}x{arch['mask_resolution']} (below)")
    hours = ckpt_meta.get("train_seconds", 0) / 3600
    device = ckpt_meta.get("train_device", "unknown")
    runs = lineage(ckpt_meta)
    if len(runs) > 1 and not runs[0].get("init_from"):
        start = f"trained **from scratch on synthetic images only** in {len(runs)} runs (the lineage below), the last"
    elif tc.get("init_from"):
        start = f"fine-tuned from `{tc['init_from']}` **on synthetic images only**"
    else:
        start = "trained **from scratch on synthetic images only**"
    return f"""# Model card: nanoseg {Path(args.out).name} model

Mask R-CNN {start}, on {device}, by this
repository's own code (after Lin et al., npj Comput. Mater. 2022). Released from
`{args.run_dir}` at commit `{_git_commit()}`.

## Architecture
- {arch['architecture']}; {params / 1e6:.1f} M parameters; single-channel input;
  {head}x{head} mask head{refined}.
- Anchors {cfg['anchor_sizes']} px, aspect ratios {cfg['aspect_ratios']}; RPN
  {cfg['rpn_pre_nms_top_n_test']} -> {cfg['rpn_post_nms_top_n_test']} proposals at test; up to
  {cfg['detections_per_img']} detections.
- `model.pt`: nanoseg checkpoint (weights stored as float16, {size_mb:.1f} MB; loaded and run in
  float32). The checkpoint alone rebuilds the model (config and input spec inside).

## Input spec
`{json.dumps(tc['input_spec'])}`: optical density at {tc['input_spec']['pixel_size_nm']} nm per
pixel, each frame's maximum mapped to 255 (the generator's `paper` preset). Frame preparation
(`configs/profiles/*.yaml`) converts transmission to OD and resamples to this scale.

## Training
- Command: `nanoseg train configs/training/{tc['name']}.yaml` (resumable with `--resume`;
  the training set is generated first if missing).
- Data: `nanoseg generate {gen.get('preset', '?')} --count {gen.get('count', '?')} --seed {gen.get('seed', '?')}`{mix};
  crops {tc['data']['crop_sizes']} with weights {tc['data']['crop_weights']}; augmentation
  `{json.dumps(tc['augment'])}`.
- Solver: `{json.dumps(tc['solver'])}`; seed {tc['seed']}.
- {ckpt_meta.get('iterations')} iterations ({ckpt_meta.get('iterations', 0) * tc['solver']['batch_size']} images),
  wall time {hours:.2f} h (training loop, across resumes) on {device}.
{lineage_text(ckpt_meta)}{refiner_text(ckpt_meta, model_cfg)}
## Evaluation: held-out synthetic test set
`{args.test_set}` ({metrics['images']} images, {made_by(Path(args.test_set))}). Reproduce with
`nanoseg evaluate {Path(args.out).as_posix()}/model.pt <test set> --out <dir>`.

| | AP | AP50 | AP75 | APs | APm | APl |
|---|---|---|---|---|---|---|
| box | {_table(metrics, 'bbox')} |
| mask | {_table(metrics, 'segm')} |

{operating_point_text(ckpt_meta)}
{tta_text(tta, Path(args.out).as_posix() + "/model.pt", metrics["run"]["inference_seconds_per_image"])}
Foreground accuracy TP/(TP+FP+FN): **{acc['foreground']:.3f}** (mean per image {acc['per_image_mean']:.3f}).
Count error per image: mean absolute {metrics['count']['mean_absolute']:.2f}, relative
{metrics['count']['mean_relative']:.3f}. Particle statistics, ground truth vs prediction:

| statistic | GT mean | predicted mean | Wasserstein distance |
|---|---|---|---|
{stat_rows}

Paper targets (COCO-pretrained R50-FPN, 4 GPUs): mask AP 87–90. See `report.md` and `figures/`.

## Real data
{real_table}
{"`real_overlay.png`: the model on `shared/real/ptychography_v2o5.png` (profile `ptychography_od`)." if real else ""}
{"Not run." if not (real or real_table) else ""}
""" + (args.reading or "")


def release(args: argparse.Namespace) -> Path:
    from nanoseg_training.evaluate import evaluate_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.run_dir).expanduser()
    ckpt = load_checkpoint(source) if source.is_file() else checkpoint_from_run(source)
    model_path = save_checkpoint(ckpt, out / "model.pt", half=True)
    size_mb = model_path.stat().st_size / 1e6
    reloaded = load_checkpoint(model_path)
    params = count_parameters(reloaded.build())
    if getattr(args, "validation_set", None):
        from nanoseg_training.calibrate import MASK_GRID, SCORE_GRID, calibrate, threshold_list

        calibrate(model_path, Path(args.validation_set), out / "calibration", threads=args.threads, write=True,
                  progress=not args.quiet, scores=threshold_list(args.scores, SCORE_GRID),
                  masks=threshold_list(args.masks, MASK_GRID), mask_rescoring=getattr(args, "mask_rescoring", False),
                  mask_margin_px=getattr(args, "mask_margin", None), mask_tta=getattr(args, "mask_tta", None),
                  refine_boxes=getattr(args, "refine_boxes", None))
        reloaded = load_checkpoint(model_path)
    metrics = evaluate_model(model_path, args.test_set, out / "evaluation", engine="torch", threads=args.threads,
                             progress=not args.quiet)
    tta = None
    if getattr(args, "also_mask_tta", None):
        n = int(args.also_mask_tta)
        tta = (n, evaluate_model(model_path, args.test_set, out / f"evaluation_tta{n}", engine="torch",
                                 threads=args.threads, progress=not args.quiet, plots=False, mask_tta=n))
    real_table = ""
    if getattr(args, "real_set", None):
        from nanoseg.config_io import load_yaml
        from nanoseg.frame_profile import FrameProfile
        from nanoseg.paths import resolve_config

        profile = load_yaml(resolve_config(args.real_profile, "profiles"), FrameProfile)
        runs = []
        for setting in (profile.pixel_size_nm, "auto"):
            tag = "auto" if setting == "auto" else "profile"
            runs.append((f"{setting} nm (the profile's)" if tag == "profile" else "auto", evaluate_model(
                model_path, args.real_set, out / f"evaluation_real_{tag}", engine="torch", threads=args.threads,
                progress=not args.quiet, plots=False, profile=profile, pixel_size=setting,
                max_detections=args.real_max_detections)))
        real_table = real_set_text(Path(args.real_set).name, profile.name, args.real_max_detections, runs)
    real = False
    if args.real_image:
        from nanoseg.cli import main as cli_main

        seg_out = out / "real"
        cli_main(["segment", str(args.real_image), "--model", str(model_path), "--profile", "ptychography_od",
                  "--out", str(seg_out), "--quiet"])
        overlays = list(seg_out.glob("*_overlay.png"))
        if overlays:
            shutil.copy(overlays[0], out / "real_overlay.png")
            real = True
    (out / "MODEL_CARD.md").write_text(card_text(reloaded.meta, reloaded.model_config, metrics, args, size_mb, params, real,
                                                      tta, real_table))
    return out


def cmd_release(args: argparse.Namespace) -> int:
    from nanoseg.checkpoint import CheckpointError
    from nanoseg_training.evaluate import EvaluationError

    try:
        print(f"released to {release(args)}")
    except (EvaluationError, CheckpointError) as err:
        print(f"nanoseg models release: error: {err}", file=sys.stderr)
        return 2
    return 0
