"""``nanoseg models release RUN_DIR --out models/default``: ship a trained run with its model card.

Steps: the run's weights become a float16-stored nanoseg checkpoint (``model.pt``, half the size,
run in float32), evaluated on a held-out synthetic test set (``metrics.json``, ``report.md``,
figures), run on the real ptychography image when given (``real_overlay.png``), and described in
``MODEL_CARD.md`` (about one screen: model details, training data, evaluation synthetic and real,
limits and intended use, how to reproduce; paths relative). Everything in the card is measured
here; nothing is typed in by hand.
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


def generate_command(dataset: Path) -> str | None:
    """The ``nanoseg generate`` command that made a COCO data set, from its ``info``.

    Parameters
    ----------
    dataset : Path
        Data set directory (``annotations.json`` inside).

    Returns
    -------
    str or None
        ``nanoseg generate PRESET --count N --seed S``, or None when the set was not made by
        ``nanoseg generate`` (or cannot be read).
    """
    try:
        info = json.loads((dataset / "annotations.json").read_text()).get("info", {})
    except (OSError, ValueError):
        info = {}
    preset = info.get("preset") or str(info.get("description", "")).rpartition("preset ")[2]
    if info.get("generator") != "nanoseg_training.coco_dataset" or not preset:
        return None
    return f"nanoseg generate {preset} --count {info.get('count')} --seed {info.get('seed')}"


def made_by(dataset: Path) -> str:
    """How a COCO data set was made, for a card: the generate command in backticks, or a note."""
    command = generate_command(dataset)
    return f"`{command}`" if command else "not made by `nanoseg generate`"


def lineage_text(ckpt_meta: dict[str, Any]) -> str:
    """The card's table of every training run behind the weights, oldest first (empty for one run).

    Parameters
    ----------
    ckpt_meta : dict
        The checkpoint's ``meta`` (``meta["lineage"]`` lists the earlier runs).

    Returns
    -------
    str
        A Markdown table, one row per run (config, start, iterations, images, data, training
        time in s, device, first 12 hex digits of the sha256 of the weights it ended with).
    """
    runs = lineage(ckpt_meta)
    if len(runs) < 2:
        return ""

    def data(r: dict[str, Any]) -> str:
        return " + ".join(f"`{d['preset']}` {d['count']}, seed {d['seed']}" if d else "given"
                          for d in [r.get("data"), *(r.get("mix") or [])])

    def start(i: int, r: dict[str, Any]) -> str:
        return ("from scratch" if not r.get("init_from") else f"run {i - 1}" if i > 1
                else f"`{Path(r['init_from']).name}`")

    rows = "\n".join(
        f"| {i} | `{r['name']}` | {start(i, r)} | {r['iterations']} | "
        f"{(r['iterations'] or 0) * (r['batch_size'] or 0)} | {data(r)} | {(r.get('train_seconds') or 0):.0f} s | "
        f"{r.get('train_device') or 'unknown'} | {('`' + r['sha256'][:12] + '`') if r.get('sha256') else 'this model'} |"
        for i, r in enumerate(runs, 1))
    its = sum(r["iterations"] or 0 for r in runs)
    images = sum((r["iterations"] or 0) * (r["batch_size"] or 0) for r in runs)
    hours = sum(r.get("train_seconds") or 0 for r in runs) / 3600
    return f"""
{len(runs)} runs, each from the weights the one before ended with (`meta.lineage`): {its} iterations, {images} images,
{hours:.2f} h of training in all.

| run | config | start | iterations | images | data | training time | device | weights (sha256) |
|---|---|---|---|---|---|---|---|---|
{rows}
"""


def refiner_text(ckpt_meta: dict[str, Any], model_cfg: ModelConfig) -> str:
    """The card's line on the mask refiner (empty without one).

    Parameters
    ----------
    ckpt_meta : dict
        The checkpoint's ``meta`` (``meta["mask_refiner"]``: its training config, sample count,
        per-epoch history and held-out mask IoU).
    model_cfg : ModelConfig
        The model's config (``mask_refiner``: channels and dilations).

    Returns
    -------
    str
        One Markdown list item, or ``""`` when the model has no trained refiner.
    """
    ref = model_cfg.mask_refiner
    info = ckpt_meta.get("mask_refiner")
    if ref is None or not info:
        return ""
    tc = info["config"]
    gen = tc.get("generate") or {}
    data = (f"`nanoseg generate {gen['preset']} --count {gen['count']} --seed {gen['seed']}`" if gen
            else f"`{Path(tc['data']).name}`")
    last = info["history"][-1]
    donor = info.get("transplanted_from_sha256")
    whose = ("the network it was fine-tuned from; carried over by `scripts/transplant_refiner.py` "
             f"(donor `{donor[:12]}`) and measured on validation before release. It was trained"
             if donor else "the network (unchanged)")
    return f"""- Mask refiner ({ref.channels} channels, dilations {list(ref.dilations)}), trained after {whose}
  by `nanoseg train-refiner configs/training/{tc['name']}.yaml --model <the network> --out <refined>` on that network's own
  detections on {data} (the last {tc['holdout_images']} images held out): {info['samples']} detections,
  {tc['epochs']} epochs, {last.get('seconds', 0):.0f} s on the CPU; held-out mask IoU {info['holdout_iou_coarse']:.4f} -> {info['holdout_iou']:.4f}.
"""


def interpolation_text(ckpt_meta: dict[str, Any]) -> str:
    """The card's lines on interpolated weights (``nanoseg models interpolate``; empty otherwise).

    Parameters
    ----------
    ckpt_meta : dict
        The checkpoint's ``meta`` (``meta["interpolation"]``: alpha, the parents' sha256, each
        fine-tune's runs and, when alpha was chosen, the sets, the rule and every candidate).

    Returns
    -------
    str
        A Markdown list item and, when alpha was chosen, a table of the candidates (mask AP).
    """
    rec = ckpt_meta.get("interpolation")
    if not rec:
        return ""
    tuned = rec.get("tuned") or [{  # the record's older, one-fine-tune form
        "sha256": rec["tuned_sha256"], "runs": rec.get("tuned_runs") or [
            {"name": rec.get("tuned_config") or rec.get("tuned_name") or "a fine-tune",
             "iterations": rec.get("tuned_iterations")}]}]
    each = [" then ".join(f"`{r['name']}` ({r.get('iterations') or '?'} iterations)" for r in t["runs"])
            + f", `{t['sha256'][:12]}`" for t in tuned]
    what = (f"its fine-tune {each[0]}" if len(each) == 1 else
            f"the average of its {len(each)} fine-tunes ({'; '.join(each)}; a model soup)")
    body = rec.get("body_alpha")
    body_text = "" if body is None else f" (the backbone's ResNet stages at {body:g})"
    text = (f"- Weights interpolated (WiSE-FT): {1 - rec['alpha']:g} x the network above (`{rec['start_sha256'][:12]}`) "
            f"+ {rec['alpha']:g} x {what}{body_text}, by `nanoseg models interpolate`; the start's "
            "mask refiner, config and input spec.\n")
    chosen = rec.get("chosen_on")
    if not chosen:
        return text
    bodies = any(c.get("body_alpha") is not None for c in rec["candidates"])
    rows = "\n".join(f"| {c['alpha']:g} |" + (f" {c['body_alpha']:g} |" if bodies else "")
                     + f" {c['keep_ap']:.1f} | {c['gain_ap']:.1f} |" for c in rec["candidates"])
    head = "| alpha |" + (" backbone alpha |" if bodies else "")
    return text + f"""  Alpha chosen on synthetic validation sets only: the best mask AP on `{chosen['gain_set']}` among
  the candidates that keep `{chosen['keep_set']}` within {chosen['keep_within']:g} of the start's (alpha 0).

{head} `{chosen['keep_set']}` mask AP | `{chosen['gain_set']}` mask AP |
|---|{"---|" if bodies else ""}---|---|
{rows}
"""


def _row(label: str, m: dict[str, Any]) -> str:
    return (f"| {label} | {m['images']} | {m['segm']['AP']:.1f} | {m['segm']['AP75']:.1f} | {m['bbox']['AP']:.1f} | "
            f"{m['accuracy']['foreground']:.3f} | {m['count']['mean_absolute']:.2f} | "
            f"{m['run']['inference_seconds_per_image']:.2f} |")


def evaluation_text(metrics: dict[str, Any], test_set: Path, model: str,
                    tta: tuple[int, dict[str, Any]] | None = None, real_measured: bool = False) -> str:
    """The card's evaluation: the synthetic test set (and its TTA row), then the real-image placeholder.

    Parameters
    ----------
    metrics : dict
        ``metrics.json`` of ``nanoseg evaluate`` on the held-out synthetic test set.
    test_set : Path
        That data set's directory; the card names it by folder and by the command that made it.
    model : str
        The model's path relative to the repository, e.g. ``models/default/model.pt``.
    tta : (int, dict), optional
        Number of mask TTA views and the metrics of the same test set evaluated with them.
    real_measured : bool, optional
        Whether the card carries a real-data table (then no placeholder row).

    Returns
    -------
    str
        Markdown: one table (mask AP and AP75, box AP, foreground accuracy TP/(TP+FP+FN), mean
        absolute count error per image, seconds per image on this evaluation's CPU threads).
    """
    made = made_by(test_set)
    rows = [_row(f"synthetic `{test_set.name}` ({made})", metrics)]
    if tta is not None:
        rows.append(_row(f"the same, `--mask-tta {tta[0]}`", tta[1]))
    width = metrics["statistics"].get("width_px")
    widths = ("" if width is None else
              f" Mean wire width: {width['pred_mean']:.2f} px predicted, {width['gt_mean']:.2f} px true.")
    if not real_measured:
        rows.append("| real `rods_dev`, per contrast | — | — | — | — | — | — | — |")
    real = ("" if real_measured else " Real: not measured in this release; the table per contrast comes from "
            f"`nanoseg evaluate {model} <real set> --profile <profile> --out <dir>`.")
    return f"""| test set | images | mask AP | mask AP75 | box AP | foreground accuracy | count error | s per image |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Synthetic: `nanoseg evaluate {model} <test set> --out <dir>` (`evaluation/report.md` has AP by size,
particle statistics and where mask AP is lost).{widths}{real}
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
    """The model card, about one screen: details, training data, evaluation, limits, how to reproduce.

    Parameters
    ----------
    ckpt_meta : dict
        The released checkpoint's ``meta`` (training config, lineage, operating point, refiner).
    model_cfg : ModelConfig
        The released model's config.
    metrics : dict
        ``metrics.json`` of the evaluation on ``args.test_set``.
    args : argparse.Namespace
        ``nanoseg models release`` arguments (``out``, ``run_dir``, ``test_set``, ``reading``...).
    size_mb : float
        Size of ``model.pt`` in MB (10^6 bytes).
    params : int
        Number of parameters of the network.
    real : bool
        Whether ``real_overlay.png`` was written.
    tta : (int, dict), optional
        Number of mask TTA views and the metrics with them.
    real_table : str, optional
        The standing real-data table (``real_set_text``), empty when no real set was measured.

    Returns
    -------
    str
        The Markdown card. Paths in it are relative (the model as ``--out``, data sets by folder
        name and the ``nanoseg generate`` command that made them).
    """
    tc = ckpt_meta["train_config"]
    arch = describe(model_cfg)
    gen = tc["data"].get("generate") or {}
    mix = "".join(f" + `{Path(m['train']).name}` (weight {m['weight']} against {tc['data'].get('weight', 1.0)})"
                  for m in tc["data"].get("mix") or [])
    head = 2 * model_cfg.mask_roi_size
    refined = "" if model_cfg.mask_refiner is None else (
        f", refined from the image to {arch['mask_resolution']}x{arch['mask_resolution']}")
    device = ckpt_meta.get("train_device", "unknown")
    name = Path(args.out).name
    model = f"{Path(args.out).as_posix()}/model.pt"
    spec = tc["input_spec"]
    real_line = (f"`real_overlay.png`: the model on the real frame `{Path(args.real_image).name}` (profile "
                 "`ptychography_od`; no annotation, read by eye)." if real else "No real image was run.")
    return f"""# Model card: nanoseg `{name}`

## Model details
- {arch['architecture']}; {params / 1e6:.1f} M parameters; one input channel;
  {head}x{head} mask head{refined}. Trained **on synthetic images only** by this repository's code
  (after Lin et al., npj Comput. Mater. 2022); released from `{Path(args.run_dir).name}` at commit `{_git_commit()}`.
- Input: optical density at {spec['pixel_size_nm']} nm per pixel, {spec['size']} px frames, each frame's maximum
  mapped to 255; `configs/profiles/*.yaml` prepare transmission frames to this.
- `model.pt`: nanoseg checkpoint ({size_mb:.1f} MB, float16 stored, run in float32; config, input spec and
  operating point inside).
- {operating_point_text(ckpt_meta)}

## Training data
- `nanoseg generate {gen.get('preset', '?')} --count {gen.get('count', '?')} --seed {gen.get('seed', '?')}`{mix};
  crops {tc['data']['crop_sizes']} px; augmentation: {", ".join(tc['augment'])}.
- `nanoseg train configs/training/{tc['name']}.yaml`: {ckpt_meta.get('iterations')} iterations of batch
  {tc['solver']['batch_size']} on {device}.
{refiner_text(ckpt_meta, model_cfg)}{interpolation_text(ckpt_meta)}{lineage_text(ckpt_meta)}
## Evaluation

{evaluation_text(metrics, Path(args.test_set), model, tta, bool(real_table))}
### Real data
{real_table or "No annotated real set was measured."}
{real_line}

## Limits and intended use
- For nanowires in X-ray/electron transmission frames prepared to the input above, served by
  `nanoseg serve` or `nanoseg segment`. Trained on synthetic scenes only: real frames with haze,
  other contrasts or pixel sizes far from {spec['pixel_size_nm']} nm are outside what was measured.
- Paper target (COCO-pretrained R50-FPN on 4 GPUs): mask AP 87–90.

## How to reproduce
    nanoseg train configs/training/{tc['name']}.yaml      # generates its training set when missing
    {generate_command(Path(args.test_set)) or "nanoseg generate <preset> --count <n> --seed <seed>"} --out data/test
    nanoseg evaluate {model} data/test --out eval/
    nanoseg models release <run or checkpoint> --out {Path(args.out).as_posix()} --test-set data/test
""" + (f"\n{args.reading}\n" if args.reading else "")


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
