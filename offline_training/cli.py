"""The trainer's subcommands of ``nanoseg`` (entry point ``nanoseg.commands: training``).

Only argument parsing lives here, so ``nanoseg --help`` never imports torch; every handler is
``lazy("module:function")``, imported when its subcommand runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nanoseg.cli import lazy
from nanoseg.summary_stats import EDGE_RULES
from nanoseg_training.registry_cli import add_parsers as add_registry


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse ``type`` for a number > 0 (argparse names the flag in its one-line error)."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def decoding_args(p: argparse.ArgumentParser, margin: bool = True) -> None:
    """--mask-tta (and --mask-margin, --refine-boxes): replace those of the model's mask decoding."""
    if margin:
        p.add_argument("--mask-margin", type=float,
                       help="grow each box by this many px before predicting its mask (default: the model's)")
        p.add_argument("--refine-boxes", type=int, choices=[0, 1, 2, 3], metavar="PASSES",
                       help="box-head passes over the detections in every view, boxes averaged "
                            "(0: none; default: the model's)")
    p.add_argument("--mask-tta", type=int, choices=[1, 2, 4, 8],
                   help="average masks over this many flipped/transposed views (default: the model's; "
                        "costs about N x the backbone)")


def pixel_size_arg(value: str) -> float | str:
    """``--pixel-size``: a positive number of nm, or ``auto`` (chosen per frame, ``nanoseg.scale``)."""
    if value == "auto":
        return value
    try:
        nm = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel size in nm or 'auto', got {value!r}") from None
    if not nm > 0:
        raise argparse.ArgumentTypeError(f"pixel size must be > 0 nm, got {value}")
    return nm


def frame_args(p: argparse.ArgumentParser, profile_default: str | None) -> None:
    """--profile, --pixel-size and --max-detections: how image files are prepared as frames."""
    p.add_argument("--profile", default=profile_default,
                   help="frame profile in configs/profiles (tem, sem, em, ptychography, ...) or a YAML path"
                        + ("" if profile_default else "; prepares each image as the daemon does (any contrast, any size)"))
    p.add_argument("--pixel-size", type=pixel_size_arg, metavar="NM|auto",
                   help="frame pixel size, nm, or 'auto': resample each frame so its objects are as wide "
                        "as the model's training wires (default: the profile's)")
    p.add_argument("--max-detections", type=int, metavar="N",
                   help="detections kept per model input (and the RPN's proposals, at least N; default: the "
                        "model's); raise it for fields of hundreds of small particles")


def alpha_list(text: str, start: bool = True) -> list[float]:
    """``--alphas``: comma-separated weights in [0, 1], sorted, with 0 (the start) added unless
    ``start`` is false (``--body-alphas``: see ``body_alpha_list``)."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()} | ({0.0} if start else set()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"values must lie in [0, 1]: {text!r}")
    return values


def body_alpha_list(text: str) -> list[float]:
    """``--body-alphas``: comma-separated weights in [0, 1], sorted (the start is added as a pair)."""
    return alpha_list(text, start=False)


def add_interpolate(models: Any) -> None:
    """Register ``nanoseg models interpolate`` under the ``models`` sub-commands."""
    p = models.add_parser("interpolate", help="weights between a model and a fine-tune of it (WiSE-FT), "
                                              "alpha given or chosen on synthetic validation sets")
    p.add_argument("start", help="the model the fine-tune began from (e.g. models/default/model.pt)")
    p.add_argument("tuned", nargs="+", help="the fine-tuned checkpoint (e.g. RUN/model_refined.pt); several "
                                            "fine-tunes of the start are averaged first (a model soup)")
    p.add_argument("--out", required=True, help="the interpolated checkpoint (.pt)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=float, help="weight of the fine-tune, 0 (start) to 1 (fine-tune)")
    how.add_argument("--alphas", type=alpha_list, help="comma-separated weights to evaluate (0 is added); "
                                                    "needs --keep-set and --gain-set")
    p.add_argument("--body-alpha", type=float, help="with --alpha: the backbone body's own weight "
                                                    "(the ResNet stages; default --alpha)")
    p.add_argument("--body-alphas", type=body_alpha_list, help="with --alphas: the backbone body's own weights; "
                                                               "every pair with --alphas is a candidate, "
                                                               "beside the start")
    p.add_argument("--keep-set", help="COCO set whose mask AP may fall by at most --keep-within "
                                      "(e.g. the start's own validation set)")
    p.add_argument("--gain-set", help="COCO set whose mask AP is maximised (e.g. a randomised validation set)")
    p.add_argument("--keep-within", type=float, default=1.0, help="mask AP points (default 1.0)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=lazy("nanoseg_training.interpolate:cmd_interpolate"))


def add_compare(models: Any) -> None:
    """Register ``nanoseg models compare`` (before/after overlays of two or more models)."""
    p = models.add_parser("compare", help="the same images through two or more models: a grid of overlays, "
                                          "one row per model")
    p.add_argument("images", nargs="+", help="PNG, TIFF or .npy files, one column each")
    p.add_argument("--model", dest="models", action="append", required=True,
                   help="a nanoseg checkpoint; give it once per model, the first becomes the top row")
    p.add_argument("--profile", default="ptychography", help="frame profile in configs/profiles or a YAML path")
    p.add_argument("--pixel-size", type=pixel_size_arg, metavar="NM|auto", help="default: the profile's")
    p.add_argument("--out", required=True, help="the grid (.png); each model's segment outputs go beside it")
    p.add_argument("--tile-height", type=int, default=256, help="px (default 256)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=lazy("nanoseg_training.compare_models:cmd_compare"))


def add_commands(sub: Any) -> None:
    """Add generate, preview, train, train-refiner, export, evaluate, calibrate, sweep, segment
    and models to the ``nanoseg`` subparsers."""
    p = sub.add_parser("generate", help="write a synthetic COCO data set")
    p.add_argument("preset", help="preset name in configs/synthetic (paper, ptychography, stxm, sem, randomised) or a YAML path")
    p.add_argument("--out", required=True, help="output data set directory")
    p.add_argument("--count", type=int, default=100, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-od", action="store_true",
                   help="skip the float32 optical-density files od/*.npy (1 MB per 512x512 image)")
    p.set_defaults(handler=lazy("nanoseg_training.coco_dataset:cmd_generate"))

    p = sub.add_parser("preview", help="montage of a data set with mask outlines")
    p.add_argument("dataset")
    p.add_argument("--out", help="PNG path (default DATASET/preview.png)")
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.set_defaults(handler=lazy("nanoseg_training.preview:cmd_preview"))

    p = sub.add_parser("train", help="train Mask R-CNN on a synthetic COCO data set (resumable)")
    p.add_argument("config", help="training config name in configs/training or a YAML path")
    p.add_argument("--run-dir", help="run directory (default <cache>/runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--max-iter", type=positive(int), help="override solver.max_iter")
    p.add_argument("--max-minutes", type=positive(float), help="stop (resumably) after this wall time")
    p.add_argument("--stop-after", type=positive(int), help="stop (resumably) after this many iterations in total")
    p.add_argument("--data", help="use this COCO data set directory instead of the config's")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_training.train:cmd_train"))

    p = sub.add_parser("train-refiner", help="train a mask refiner on a model's own detections (minutes on a CPU)")
    p.add_argument("config", help="refiner config name in configs/training (refiner_default) or a YAML path")
    p.add_argument("--model", required=True, help="the trained model (nanoseg checkpoint)")
    p.add_argument("--out", required=True, help="the model with the refiner (nanoseg checkpoint)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_training.train_refiner:cmd_train_refiner"))

    p = sub.add_parser("export", help="export a checkpoint to ONNX or a TensorRT FP16 plan")
    p.add_argument("model", help="nanoseg checkpoint (.pt)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--out", help="output file (default: MODEL with .onnx, .int8.onnx or .plan)")
    p.add_argument("--max-batch", type=int, default=1, metavar="K",
                   help="images per run, 1 to K (computed at K: use 1 for a CPU daemon; default 1)")
    p.add_argument("--int8", action="store_true",
                   help="quantise the convolutions to int8 for the CPU (ONNX Runtime static quantisation, QDQ)")
    p.add_argument("--calibration", metavar="DIR", help="--int8: synthetic validation set to calibrate on")
    p.add_argument("--calibration-images", type=int, default=20, help="--int8: images of DIR used (default 20)")
    p.add_argument("--keep-float", action="append", metavar="PART",
                   help="--int8: node-name fragment kept float32 (e.g. /mask_refiner/); repeatable")
    p.add_argument("--reduce-range", action="store_true",
                   help="--int8: 7-bit weights, for x86 CPUs without VNNI (whose int8 products saturate)")
    decoding_args(p, margin=False)
    p.set_defaults(handler=lazy("nanoseg_training.export_model:cmd_export"))

    p = sub.add_parser("evaluate", help="COCO AP, foreground accuracy, particle statistics and a report")
    p.add_argument("model", help="nanoseg checkpoint (.pt)")
    p.add_argument("dataset", help="COCO data set directory (from nanoseg generate)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--score-threshold", type=float, default=0.05, help="score threshold of the AP predictions")
    p.add_argument("--stats-score-threshold", type=float,
                   help="operating point for accuracy, statistics and counts (default: the model's, else 0.5)")
    p.add_argument("--mask-threshold", type=float,
                   help="mask probability threshold for AP and statistics (default: the model's, else 0.5)")
    p.add_argument("--mask-rescoring", action=argparse.BooleanOptionalAction,
                   help="score = class score x maskness (default: the model's operating point, else off)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the engine")
    p.add_argument("--device", default="cpu", help="where the torch engine runs: cpu, cuda or cuda:N")
    p.add_argument("--onnx", metavar="FILE",
                   help="engine onnxruntime: run this exported graph (e.g. MODEL.int8.onnx) instead of exporting one")
    frame_args(p, None)
    p.add_argument("--group-by", default="contrast", metavar="ATTR",
                   help="also report AP and accuracy per value of this image attribute, when images carry it "
                        "(default: contrast; '' for none)")
    decoding_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_training.evaluate:cmd_evaluate"))

    p = sub.add_parser("calibrate", help="choose the model's operating point (score and mask thresholds) on a validation set")
    p.add_argument("model", help="nanoseg checkpoint (.pt)")
    p.add_argument("dataset", help="COCO validation set directory (another seed than the test set)")
    p.add_argument("--out", required=True, help="directory for calibration.{csv,md}")
    p.add_argument("--objective", choices=["foreground_accuracy", "count_mae"], default="foreground_accuracy")
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--limit", type=int, help="the first N images only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scores", help="score thresholds to try, comma-separated (default 0.1,...,0.9; one value fixes it)")
    p.add_argument("--masks", help="mask thresholds to try, comma-separated (default 0.3,0.35,...,0.65)")
    p.add_argument("--mask-rescoring", action="store_true",
                   help="thresholds apply to class score x maskness; stored with the point")
    p.add_argument("--write", action="store_true", help="store the operating point in the checkpoint")
    decoding_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_training.calibrate:cmd_calibrate"))

    p = sub.add_parser("sweep", help="train and evaluate a grid of training configs (paper Table 1)")
    p.add_argument("sweep", help="sweep name in configs/sweeps or a YAML path")
    p.add_argument("--out", help="output directory (default <cache>/sweeps/<name>)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_training.sweep:cmd_sweep"))

    p = sub.add_parser("segment", help="segment image files: overlays, particle tables, distribution plots")
    p.add_argument("images", nargs="+", help="PNG, TIFF or .npy files")
    p.add_argument("--model", help="nanoseg checkpoint (default models/default/model.pt)")
    frame_args(p, "ptychography")
    p.add_argument("--out", required=True)
    p.add_argument("--engine", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    p.add_argument("--flat-field", help="flat-field (I0) image for profiles with i0 policy flat_field")
    p.add_argument("--score-threshold", type=float, help="default: the model's operating point")
    p.add_argument("--mask-threshold", type=float, help="default: the model's operating point")
    p.add_argument("--mask-rescoring", action=argparse.BooleanOptionalAction,
                   help="score = class score x maskness (default: the model's operating point, else off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--edge-rule", choices=EDGE_RULES, default="include",
                   help="counting rule of the summaries for particles touching the border (docs/measurements.md)")
    decoding_args(p, margin=False)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lazy("nanoseg_training.segment_files:cmd_segment"))

    p = sub.add_parser("models", help="manage model checkpoints")
    models = p.add_subparsers(dest="models_command", required=True)
    q = models.add_parser("release", help="ship a training run: fp16 checkpoint, evaluation, model card")
    q.add_argument("run_dir", help="training run directory (config.yaml + last.pt), or a nanoseg checkpoint "
                                   "(one trained elsewhere, e.g. copied back from a GPU machine)")
    q.add_argument("--out", default="models/default")
    q.add_argument("--test-set", required=True, help="held-out COCO data set (nanoseg generate ... --seed 2)")
    q.add_argument("--validation-set", help="choose the model's operating point on this COCO set first (nanoseg calibrate)")
    q.add_argument("--scores", help="calibration score thresholds, comma-separated (one value fixes it)")
    q.add_argument("--masks", help="calibration mask thresholds, comma-separated")
    q.add_argument("--mask-rescoring", action="store_true", help="calibrate with class score x maskness")
    decoding_args(q)
    q.add_argument("--also-mask-tta", type=int, choices=[2, 4, 8],
                   help="evaluate the test set a second time with this many views; the card reports both")
    q.add_argument("--real-image", help="a real image to segment for the card's overlay")
    q.add_argument("--real-set", help="an annotated real COCO set (e.g. rods_dev): the card's real-data table, "
                                      "at the profile's pixel size and at auto, per contrast")
    q.add_argument("--real-profile", default="em", help="frame profile for --real-set (default em)")
    q.add_argument("--real-max-detections", type=int, default=300, metavar="N",
                   help="detections per model input for --real-set (default 300)")
    q.add_argument("--reading", help="extra Markdown appended to the card (an honest reading of the overlay)")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(handler=lazy("nanoseg_training.release_model:cmd_release"))

    q = models.add_parser("import-detectron2", help="import a detectron2 Mask R-CNN (config YAML + weights)")
    q.add_argument("config", help="the full detectron2 config YAML (cfg.dump())")
    q.add_argument("weights", help="detectron2 checkpoint, e.g. model_final.pth")
    q.add_argument("--out", required=True, help="output directory: model.pt and import_report.json")
    q.add_argument("--pixel-size-nm", type=float, help="pixel size of the training images, nm (default 1)")
    q.set_defaults(handler=lazy("nanoseg_training.import_detectron2:cmd_import_detectron2"))
    add_registry(models)  # list, register, show, promote, rollback, export-triton
    add_interpolate(models)
    add_compare(models)
