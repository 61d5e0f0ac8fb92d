"""``nanoseg train CONFIG``: SGD with warm-up and steps, resumable, on CPU, one GPU or many.

Run state lives in a run directory (default ``<cache>/runs/<name>``): ``last.pt`` (weights,
optimiser, iteration; written atomically every ``checkpoint_period`` iterations), ``metrics.csv``,
TensorBoard events, and at the end ``model_final.pt``, a nanoseg checkpoint. ``--resume``
continues from ``last.pt`` with the same batches an uninterrupted run would have seen. A run
that starts from ``init_from`` writes ``lineage.json`` (the runs behind those weights and their
sha256), so its checkpoints carry their whole training history (``meta["lineage"]``).
Multi-GPU: ``torchrun --nproc-per-node N -m nanoseg.cli train CONFIG`` (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
from torch import nn
from tqdm import tqdm

from nanoseg.checkpoint import Checkpoint, file_sha256, load_checkpoint, save_checkpoint
from nanoseg.config_io import ConfigError, dump_yaml, load_yaml, read_yaml_mapping
from nanoseg.input_spec import InputSpec
from nanoseg.model import build_model
from nanoseg.paths import REPO_ROOT, cache_dir, resolve_config
from nanoseg_training.train_config import DataConfig, GenerateSpec, MixSource, TrainConfig
from nanoseg_training.train_data import (
    BadSampleError,
    BatchDataset,
    CocoSource,
    FramePreparation,
    MixedSource,
)

T = TypeVar("T")

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
MAX_NONFINITE_STREAK = 10
"""Consecutive iterations with a NaN/inf loss that are skipped before the run stops."""


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Learning rate of iteration ``it``: linear warm-up from 0.1 %, then multi-step decay."""
    s = cfg.solver
    lr = s.base_lr * s.gamma ** sum(it >= int(f * s.max_iter) for f in s.steps)
    if it < s.warmup_iters:
        alpha = it / max(s.warmup_iters, 1)
        lr *= 0.001 * (1 - alpha) + alpha
    return lr


def resolve_data_dir(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else cache_dir() / p


def frame_preparation(profile: str | None, pixel_size_nm: float | Literal["auto"] | None,
                      spec: InputSpec) -> FramePreparation | None:
    """How a set's images become model input: None for generated sets, else its frame profile."""
    if profile is None:
        return None
    from nanoseg.config_io import load_yaml
    from nanoseg.frame_profile import FrameProfile
    from nanoseg.paths import resolve_config

    return FramePreparation(load_yaml(resolve_config(profile, "profiles"), FrameProfile), spec, pixel_size_nm)


def ensure_dataset(train: str, generate: GenerateSpec | None, workers: int) -> Path:
    """A training set directory, generated first (seeded) when missing and a spec is given.

    Generation runs before training, so it may use every core (``workers`` processes)."""
    root = resolve_data_dir(train)
    if (root / "annotations.json").exists() or generate is None:
        return root
    from nanoseg.config_io import load_yaml
    from nanoseg.paths import resolve_config
    from nanoseg_training.coco_dataset import write_dataset
    from nanoseg_training.synthetic_config import SceneConfig

    scene = load_yaml(resolve_config(generate.preset, "synthetic"), SceneConfig)
    tmp = root.with_name(root.name + ".partial")
    write_dataset(scene, tmp, generate.count, generate.seed, workers=workers, write_od=False)
    tmp.rename(root)
    return root


def resolve_init(path: str) -> Path:
    """``init_from`` as given, or relative to the repository (``models/default/model.pt``)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def init_weights(model: nn.Module, checkpoint: Checkpoint, path: Path, verbose: bool = True) -> list[str]:
    """Load the tensors of ``checkpoint`` (read from ``path``) that fit ``model`` (same name and shape).

    Returns the names of this model's tensors left as initialised."""
    own = model.state_dict()
    fits = {k: v.to(own[k].dtype) for k, v in checkpoint.state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    missing = sorted(set(own) - set(fits))
    if verbose:
        print(f"init_from {path}: {len(fits)} tensors loaded, {len(missing)} left as initialised"
              + (f" ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''})" if missing else ""))
    return missing


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Module]:
    """Stop training the parameters under ``prefixes``; returns their BatchNorm modules (to keep
    in eval mode). An unknown prefix is an error naming it."""
    if not prefixes:
        return []
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n, _ in model.named_parameters()):
            raise ValueError(f"freeze: no parameter of the model starts with {prefix!r}")
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
    return [m for name, m in model.named_modules()
            if name.startswith(prefixes) and isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    info = DistInfo(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def train(cfg: TrainConfig, run_dir: Path | None = None, resume: bool = False,
          max_minutes: float | None = None, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train; returns the path of ``model_final.pt`` (or of ``last.pt`` when stopped early).

    ``max_minutes`` / ``stop_after`` (an iteration count) stop a run early and resumably, with
    the schedule of the full ``max_iter``: a sitting-limited run continues with ``--resume``.
    """
    dist = init_distributed()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dist.rank)
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(run_dir) if run_dir else cache_dir() / "runs" / cfg.name
    last = run_dir / "last.pt"
    if not resume and last.exists():
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
    if resume and last.exists() and (run_dir / "config.yaml").exists():
        _check_resumable(run_dir / "config.yaml", cfg)
    sets = [(cfg.data.train, cfg.data.generate, cfg.data.weight)] + [(m.train, m.generate, m.weight) for m in cfg.data.mix]
    roots = [ensure_dataset(t, g, os.cpu_count() or cfg.threads) if dist.main else resolve_data_dir(t) for t, g, _ in sets]
    if dist.world > 1:
        torch.distributed.barrier()
    data_sets: list[DataConfig | MixSource] = [cfg.data, *cfg.data.mix]
    preps = [frame_preparation(d.profile, d.pixel_size_nm, cfg.input_spec) for d in data_sets]
    sources = [CocoSource(r, p) for r, p in zip(roots, preps)]
    for src in sources:  # before anything is written: a missing file stops the run here, not mid-way
        for note in src.check(cfg.data.on_bad_sample):
            if dist.main:
                print(f"warning: {note}", file=sys.stderr)
    source: CocoSource | MixedSource = sources[0]
    if cfg.data.mix:
        source = MixedSource(sources, [w for _, _, w in sets])
    run_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg.model)
    if cfg.init_from and not (resume and last.exists()):
        init_path = resolve_init(cfg.init_from)
        init_ckpt = load_checkpoint(init_path)
        init_weights(model, init_ckpt, init_path, verbose=dist.main)
        if dist.main:
            runs = lineage_before(init_ckpt.meta, file_sha256(init_path))
            (run_dir / "lineage.json").write_text(json.dumps(runs, indent=1))
        del init_ckpt  # not held (its tensors) for the whole run
    frozen = freeze(model, cfg.freeze)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.solver.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.solver.base_lr, momentum=cfg.solver.momentum,
    )
    start = 0
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        if "rng" in state:  # ROI/anchor sampling draws from torch's RNG: continue its stream
            torch.set_rng_state(state["rng"])
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    trained_on = describe_device(device, dist.world)

    batches = BatchDataset(source, cfg.data, cfg.augment, cfg.solver.batch_size, cfg.seed, dist.rank)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, cfg.solver.max_iter),
        num_workers=cfg.workers, persistent_workers=False, prefetch_factor=2 if cfg.workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG stream for the model
    )
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.train()
    for m in frozen:
        m.eval()  # frozen BatchNorm keeps its statistics
    t_start = time.monotonic()
    skipped = 0
    nonfinite = 0
    it = start
    stopped_by_time = False
    with MetricsLog(run_dir, enabled=dist.main) as log, tqdm(
        total=cfg.solver.max_iter, initial=start, desc=cfg.name, disable=not (progress and dist.main),
        dynamic_ncols=True,
    ) as bar:
        for it, (images, targets, bad) in enumerate(_worker_errors_as_raised(loader), start=start):
            skipped += bad
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, it)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, enabled=use_amp):
                losses: dict[str, torch.Tensor] = model(images, targets)
                loss = cast(torch.Tensor, sum(losses.values()))  # training mode: never empty
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                # An fp16 overflow under AMP, or a degenerate batch: skip the step; stop if it persists.
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE_STREAK:
                    raise FloatingPointError(f"iteration {it}: loss is {loss.item()} for {nonfinite} iterations "
                                             f"in a row ({ {k: float(v.detach()) for k, v in losses.items()} })")
                skipped += 1
                bar.update(1)
                continue
            nonfinite = 0
            scaler.scale(loss).backward()
            if cfg.solver.clip_grad_norm:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            bar.update(1)
            done = it + 1
            if done % cfg.log_period == 0 or done == cfg.solver.max_iter:
                vals = log.write(done, time.monotonic() - t_start, lr_at(cfg, it), losses, cfg.log_period, skipped)
                bar.set_postfix(loss=f"{vals['loss']:.3f}", mask=f"{vals['loss_mask']:.3f}", lr=f"{lr_at(cfg, it):.4f}")
            if dist.main and done % cfg.checkpoint_period == 0:
                _save_state(last, model, opt, done, trained_on)
            if (max_minutes is not None and (time.monotonic() - t_start) > 60 * max_minutes) or \
                    (stop_after is not None and done >= stop_after):
                stopped_by_time = done < cfg.solver.max_iter
                break
    done = it + 1 if cfg.solver.max_iter > start else start
    if dist.main:
        _save_state(last, model, opt, done, trained_on)
    if stopped_by_time or done < cfg.solver.max_iter:
        return last
    final = run_dir / "model_final.pt"
    if dist.main:
        save_checkpoint(checkpoint_from_run(run_dir), final)
    return final


def checkpoint_from_run(run_dir: Path) -> Checkpoint:
    """A nanoseg checkpoint from a run directory's ``config.yaml`` and ``last.pt`` (any iteration)."""
    from nanoseg.config_io import load_yaml

    cfg = load_yaml(run_dir / "config.yaml", TrainConfig)
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    meta: dict[str, Any] = {"name": cfg.name, "iterations": int(state["iteration"]), "seed": cfg.seed,
                            "train_config": cfg.model_dump(mode="json"), "train_seconds": _elapsed(run_dir),
                            "train_device": str(state.get("device", "unknown"))}
    before = run_dir / "lineage.json"
    if before.exists():
        meta["lineage"] = [*json.loads(before.read_text()), training_stage(meta)]
    return Checkpoint(cfg.model, cfg.input_spec.model_dump(mode="json"), state["model"], meta)


def training_stage(meta: dict[str, Any]) -> dict[str, Any]:
    """What one training run did, from its checkpoint's meta: a row of a lineage."""
    tc = meta.get("train_config") or {}
    data = tc.get("data") or {}
    stage = {"name": meta.get("name"), "iterations": meta.get("iterations"),
             "batch_size": (tc.get("solver") or {}).get("batch_size"), "seed": meta.get("seed"),
             "data": data.get("generate"), "init_from": tc.get("init_from"),
             "train_seconds": meta.get("train_seconds"), "train_device": meta.get("train_device")}
    if data.get("mix"):
        stage["mix"] = [m.get("generate") for m in data["mix"]]
    return stage


def lineage(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every training run behind a checkpoint, oldest first (the last is the checkpoint's own)."""
    return list(meta.get("lineage") or [training_stage(meta)])


def lineage_before(meta: dict[str, Any], sha256: str) -> list[dict[str, Any]]:
    """The runs behind an ``init_from`` checkpoint (its ``meta``), the last one with the sha256 of
    that checkpoint's file (``init_from`` is a path, and a path can get new weights)."""
    runs = lineage(meta)
    runs[-1] = {**runs[-1], "sha256": sha256}
    return runs


class MetricsLog:
    """metrics.csv (appended across resumes) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.last_time = 0.0

    def __enter__(self) -> MetricsLog:
        self.file = None
        self.tb = None
        if self.enabled:
            path = self.run_dir / "metrics.csv"
            new = not path.exists()
            self.file = open(path, "a", newline="")
            self.csv = csv.writer(self.file)
            if new:
                self.csv.writerow(["iteration", "time", "lr", "loss", *LOSS_KEYS, "seconds_per_iter", "skipped"])
            self.tb = _tensorboard(self.run_dir)
        return self

    def write(self, done: int, elapsed: float, lr: float, losses: dict[str, torch.Tensor],
              period: int, skipped: int) -> dict[str, float]:
        vals = {k: float(losses[k].detach()) if k in losses else 0.0 for k in LOSS_KEYS}
        vals["loss"] = sum(vals[k] for k in LOSS_KEYS)
        spi = (elapsed - self.last_time) / period
        self.last_time = elapsed
        if self.file is not None:
            self.csv.writerow([done, f"{elapsed:.1f}", f"{lr:.6f}", f"{vals['loss']:.5f}",
                               *[f"{vals[k]:.5f}" for k in LOSS_KEYS], f"{spi:.3f}", skipped])
            self.file.flush()
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(f"loss/{k}" if k != "loss" else "loss/total", v, done)
            self.tb.add_scalar("lr", lr, done)
        return vals

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _elapsed(run_dir: Path) -> float:
    """Wall time of the whole run across resumes: the last 'time' column summed per session."""
    total, prev = 0.0, 0.0
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            t = float(row["time"])
            if t < prev:
                total += prev
            prev = t
    return total + prev


def describe_device(device: torch.device, world: int = 1) -> str:
    """What a run trains on, for the model card: GPU name and count, or CPU and threads."""
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)} (CUDA, mixed precision)"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _worker_errors_as_raised(batches: Iterable[T]) -> Iterator[T]:
    """``batches``, with a ``BadSampleError`` of a DataLoader worker re-raised as the worker raised
    it: one line naming the file (torch re-raises it with the worker's traceback in the message)."""
    try:
        yield from batches
    except BadSampleError as err:
        lines = str(err).strip().splitlines()
        if len(lines) <= 1:
            raise
        raise BadSampleError(lines[-1].split("BadSampleError: ", 1)[-1]) from None


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, iteration: int, device: str) -> None:
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "iteration": iteration,
                "rng": torch.get_rng_state(), "device": device}, tmp)
    os.replace(tmp, path)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(run_dir / "tb"))


RESUME_MAY_CHANGE = frozenset({"solver.max_iter", "threads", "workers", "checkpoint_period", "log_period"})
"""Settings a resumed run may change (how long and how it runs, not what it learns)."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value} (lists and scalars are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_resumable(stored: Path, cfg: TrainConfig) -> None:
    """Raise ConfigError naming the settings in which ``cfg`` differs from the run's own config
    (``stored``), but for ``RESUME_MAY_CHANGE``: a resumed run must learn what it began with."""
    was = _flat(TrainConfig.model_validate(read_yaml_mapping(stored)).model_dump(mode="json"))
    now = _flat(cfg.model_dump(mode="json"))
    changed = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        shown = ", ".join(f"{k} ({was.get(k)!r} -> {now.get(k)!r})" for k in changed[:6])
        raise ConfigError(f"{stored.parent}: --resume with another config: {shown}"
                          f"{' and more' if len(changed) > 6 else ''}; only {', '.join(sorted(RESUME_MAY_CHANGE))} "
                          "may change (or train into another --run-dir)")


def cmd_train(args: argparse.Namespace) -> int:
    """``nanoseg train CONFIG``: train (or resume) a run; prints the checkpoint written."""
    cfg = load_yaml(resolve_config(args.config, "training"), TrainConfig)
    if args.max_iter is not None:
        cfg = cfg.model_copy(update={"solver": cfg.solver.model_copy(update={"max_iter": args.max_iter})})
    if args.data is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": args.data, "generate": None})})
    out = train(cfg, Path(args.run_dir) if args.run_dir else None, args.resume, args.max_minutes, not args.quiet,
                args.stop_after)
    print(f"{'finished' if out.name == 'model_final.pt' else 'stopped, resume with --resume'}: {out}")
    return 0
