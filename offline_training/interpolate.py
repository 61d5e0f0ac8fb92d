"""Weight interpolation between a model and a fine-tune of it (WiSE-FT, Wortsman et al., CVPR 2022).

A network fine-tuned from another stays in the same basin of the loss, so the straight line
between the two sets of weights passes through models that keep much of the start's accuracy on
its own data while gaining much of the fine-tune's robustness::

    nanoseg models interpolate models/default/model.pt RUN/model_refined.pt --alpha 0.5 --out M.pt

``alpha`` 0 is the start, 1 the fine-tune. Several fine-tunes of the same start (other data
mixes, other seeds) are averaged first, uniformly (a "model soup", Wortsman et al., ICML 2022),
and the line runs from the start to their average. The backbone's body (the ResNet, ``backbone.body``:
the low-level features, where a new look of the input is learned) may take its own alpha
(``body_alpha``), so that the input's new looks are learned further than the heads move. The start's architecture, input spec, operating point
and mask refiner are kept (a transplanted refiner is the same in both); the interpolation is
recorded in ``meta.interpolation``. Choose ``alpha`` on synthetic validation sets only
(``--alphas`` evaluates a list and picks by the rule in :func:`choose_alpha`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nanoseg.checkpoint import (
    Checkpoint,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from nanoseg_training.train import lineage

BODY_PREFIX = "backbone.body."
"""Keys that ``body_alpha`` applies to: the backbone's ResNet stages, before the FPN."""


def interpolate(start: Checkpoint, tuned: Checkpoint, alpha: float,
                body_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The weights ``(1 - alpha) * start + alpha * tuned``, key by key.

    Parameters
    ----------
    start : Checkpoint
        The model the fine-tune began from; its keys and shapes define the result.
    tuned : Checkpoint
        The fine-tuned model. Keys it lacks (e.g. ``num_batches_tracked`` after a run with
        frozen batch norm) and integer buffers keep the start's values.
    alpha : float
        Weight of ``tuned``, 0 to 1.
    body_alpha : float, optional
        Weight of ``tuned`` for the backbone's body (keys starting with ``BODY_PREFIX``);
        default ``alpha``.

    Returns
    -------
    dict of str to torch.Tensor
        A float32 state dict for ``start.model_config``.

    Raises
    ------
    CheckpointError
        If ``alpha`` or ``body_alpha`` is outside [0, 1] or a shared key has another shape.
    """
    body = alpha if body_alpha is None else body_alpha
    for name, value in (("alpha", alpha), ("body_alpha", body)):
        if not 0.0 <= value <= 1.0:
            raise CheckpointError(f"{name}: {value} is outside [0, 1]")
    out: dict[str, torch.Tensor] = {}
    for key, a in start.state_dict.items():
        b = tuned.state_dict.get(key)
        if b is None or not a.is_floating_point():
            out[key] = a
            continue
        if b.shape != a.shape:
            raise CheckpointError(f"{key}: shape {tuple(b.shape)} in the fine-tune, {tuple(a.shape)} in the start")
        out[key] = torch.lerp(a.float(), b.float(), body if key.startswith(BODY_PREFIX) else alpha)
    return out


def soup(tuned: list[Checkpoint]) -> Checkpoint:
    """The uniform average of fine-tunes of one start (a "model soup"), key by key.

    Parameters
    ----------
    tuned : list of Checkpoint
        One or more fine-tunes of the same network, averaged as a running mean (``interpolate``
        with weight 1/k for the k-th): integer buffers keep the first one's values, and a
        fine-tune that lacks a key leaves the mean of that key as it stands.

    Returns
    -------
    Checkpoint
        The first fine-tune with the averaged float32 weights (its meta unchanged).

    Raises
    ------
    CheckpointError
        If ``tuned`` is empty or a shared key has two shapes.
    """
    if not tuned:
        raise CheckpointError("tuned: at least one fine-tune is needed")
    mean = tuned[0]
    for k, t in enumerate(tuned[1:], start=2):  # a running mean: the k-th joins with weight 1/k
        mean = replace(mean, state_dict=interpolate(mean, t, 1.0 / k))
    return mean


def interpolated_checkpoint(start_path: Path, tuned_paths: list[Path], alpha: float,
                            body_alpha: float | None = None) -> Checkpoint:
    """The start checkpoint with interpolated weights and the interpolation recorded in its meta.

    Parameters
    ----------
    start_path : Path
        nanoseg checkpoint of the start.
    tuned_paths : list of Path
        One or more fine-tunes trained from the start's weights (several are averaged, ``soup``).
    alpha : float
        Weight of the fine-tune (or of the average of the fine-tunes), 0 to 1.
    body_alpha : float, optional
        The backbone body's own weight (``interpolate``); default ``alpha``.

    Returns
    -------
    Checkpoint
        ``meta.interpolation``: ``alpha``, ``body_alpha`` where given, the start's sha256 and, for each fine-tune
        (``tuned``), its sha256, run name, iterations, training config name and its runs after
        the start's (``runs``: name and iterations of each, from ``meta.lineage``).
    """
    return _Parents.load(start_path, tuned_paths).at(alpha, body_alpha)


def tuned_record(path: Path, ckpt: Checkpoint, start: Checkpoint) -> dict[str, Any]:
    """One fine-tune as ``meta.interpolation.tuned`` lists it.

    Parameters
    ----------
    path : Path
        The fine-tune's file (hashed).
    ckpt : Checkpoint
        The fine-tune, read from ``path``.
    start : Checkpoint
        The start: its runs are left out of the fine-tune's ``runs``.

    Returns
    -------
    dict
        ``sha256``, ``name``, ``iterations``, ``config`` (training config name) and ``runs``
        (name and iterations of each run after the start's).
    """
    before = len(lineage(start.meta))
    runs = lineage(ckpt.meta)
    runs = runs[before:] if len(runs) > before else runs[-1:]  # the fine-tune's own runs, after the start's
    return {"sha256": file_sha256(path), "name": ckpt.meta.get("name"), "iterations": ckpt.meta.get("iterations"),
            "config": (ckpt.meta.get("train_config") or {}).get("name"),
            "runs": [{"name": r.get("name"), "iterations": r.get("iterations")} for r in runs]}


@dataclass(frozen=True)
class _Parents:
    """Both checkpoints and their record, read once for every alpha of a grid."""

    start: Checkpoint
    tuned: Checkpoint
    record: dict[str, Any]

    @classmethod
    def load(cls, start_path: Path, tuned_paths: list[Path]) -> _Parents:
        start = load_checkpoint(start_path)
        tuned = [load_checkpoint(p) for p in tuned_paths]
        record = {"start_sha256": file_sha256(start_path),
                  "tuned": [tuned_record(p, t, start) for p, t in zip(tuned_paths, tuned, strict=True)]}
        return cls(start, soup(tuned), record)

    def at(self, alpha: float, body_alpha: float | None = None, **extra: Any) -> Checkpoint:
        """The start with the weights at ``alpha`` (the body at ``body_alpha``); ``extra`` joins the
        record (how alpha was chosen)."""
        record = {"alpha": alpha} | ({} if body_alpha is None else {"body_alpha": body_alpha}) | self.record | extra
        return replace(self.start, state_dict=interpolate(self.start, self.tuned, alpha, body_alpha),
                       meta=self.start.meta | {"interpolation": record})


@dataclass(frozen=True)
class Candidate:
    """One interpolation measured on the validation sets (mask AP x100)."""

    alpha: float
    keep_ap: float
    gain_ap: float
    body_alpha: float | None = None
    """The backbone body's own alpha; None: ``alpha``."""

    @property
    def body(self) -> float:
        """The alpha the backbone's body is at."""
        return self.alpha if self.body_alpha is None else self.body_alpha

    @property
    def name(self) -> str:
        """``alpha A`` or ``alpha A body B`` (``pair_name``)."""
        return pair_name(self.alpha, self.body_alpha)


def pair_name(alpha: float, body_alpha: float | None) -> str:
    """``alpha A`` or ``alpha A body B``, as printed and in file names (with ``_``).

    Parameters
    ----------
    alpha, body_alpha : float
        The interpolation's alpha and the backbone body's own (None: the same).

    Returns
    -------
    str
        The name.
    """
    return f"alpha {alpha:g}" + ("" if body_alpha is None else f" body {body_alpha:g}")


def choose_alpha(candidates: list[Candidate], keep_within: float) -> Candidate:
    """The candidate with the best ``gain_ap`` among those that keep ``keep_ap`` near the start's.

    Parameters
    ----------
    candidates : list of Candidate
        Must include the start (``alpha`` 0, its body at 0), whose ``keep_ap`` is the reference.
    keep_within : float
        Largest loss of ``keep_ap`` against the start allowed, mask AP points.

    Returns
    -------
    Candidate
        Highest ``gain_ap`` with ``keep_ap >= start.keep_ap - keep_within``; ties go to the
        smaller ``alpha``, then the smaller body alpha. The start itself qualifies, so there is
        always an answer.
    """
    start = next((c for c in candidates if c.alpha == 0.0 and c.body == 0.0), None)
    if start is None:
        raise ValueError("candidates: alpha 0 (the start) is needed as the reference")
    allowed = [c for c in candidates if c.keep_ap >= start.keep_ap - keep_within]
    return max(allowed, key=lambda c: (c.gain_ap, -c.alpha, -c.body))


def cmd_interpolate(args: argparse.Namespace) -> int:
    """``nanoseg models interpolate``: one alpha, or a list chosen between on validation sets.

    Parameters
    ----------
    args : argparse.Namespace
        ``start``, ``tuned`` (a list), ``out``; ``alpha`` (and ``body_alpha``), or ``alphas`` (and
        ``body_alphas``: every pair is a candidate, and the start) with ``keep_set``, ``gain_set``, ``keep_within``
        and ``threads``.

    Returns
    -------
    int
        0, or 2 when a checkpoint, alpha or set is unusable (named on standard error).
    """
    from nanoseg_training.evaluate import EvaluationError, evaluate_model

    out = Path(args.out)
    tuned = [Path(t) for t in args.tuned]
    try:
        if args.alpha is not None:
            save_checkpoint(interpolated_checkpoint(Path(args.start), tuned, args.alpha, args.body_alpha),
                            out, half=True)
            print(f"wrote {out} ({pair_name(args.alpha, args.body_alpha)})")
            return 0
        if args.body_alpha is not None:
            raise CheckpointError("--body-alpha goes with --alpha; with --alphas give --body-alphas")
        if not (args.keep_set and args.gain_set):
            raise CheckpointError("--alphas needs --keep-set and --gain-set")
        work = out.with_suffix("")
        work.mkdir(parents=True, exist_ok=True)
        parents = _Parents.load(Path(args.start), tuned)
        grid = ([(a, None) for a in args.alphas] if args.body_alphas is None else
                sorted({(0.0, 0.0)} | {(a, b) for a in args.alphas for b in args.body_alphas}))
        rows: list[Candidate] = []
        for alpha, body_alpha in grid:
            name = pair_name(alpha, body_alpha).replace(" ", "_")
            path = work / f"{name}.pt"
            save_checkpoint(parents.at(alpha, body_alpha), path, half=True)
            sets = {Path(s).resolve(): Path(s) for s in (args.keep_set, args.gain_set)}  # one set named twice: once
            ap_of = {key: evaluate_model(path, s, work / name / s.name, engine="torch", threads=args.threads,
                                         progress=False, plots=False)["segm"]["AP"] for key, s in sets.items()}
            aps = [ap_of[Path(s).resolve()] for s in (args.keep_set, args.gain_set)]
            rows.append(Candidate(alpha, aps[0], aps[1], body_alpha))
            print(f"{rows[-1].name}: {Path(args.keep_set).name} {aps[0]:.1f}, {Path(args.gain_set).name} "
                  f"{aps[1]:.1f}", flush=True)
        best = choose_alpha(rows, args.keep_within)
        chosen = parents.at(best.alpha, best.body_alpha, chosen_on={"keep_set": Path(args.keep_set).name,
                                                   "gain_set": Path(args.gain_set).name,
                                                   "keep_within": args.keep_within},
                            candidates=[asdict(c) for c in rows])
        save_checkpoint(chosen, out, half=True)
        (work / "choice.json").write_text(json.dumps(chosen.meta["interpolation"], indent=1))
        print(f"wrote {out} ({best.name}, chosen on {Path(args.keep_set).name} within "
              f"{args.keep_within} and {Path(args.gain_set).name})")
    except (CheckpointError, EvaluationError) as err:
        print(f"nanoseg models interpolate: error: {err}", file=sys.stderr)
        return 2
    return 0
