"""Raw network detections -> instances: mask pasting, thresholds, small and nested instances.

Mask pasting follows detectron2's pixel model: a box (x0, y0, x1, y1) in pixel-edge coordinates
is covered by the M x M probability grid, cell centres at x0 + (j + 0.5) * (x1 - x0) / M + offset;
each pixel centre inside the (offset) box samples the grid bilinearly, with zeros beyond the grid
(so the mask fades to the box edge, as detectron2's ``paste_masks_in_image``), and is foreground
when the probability >= ``mask_threshold``. The offset is the model's training convention
(``nanoseg.model.mask_grid_offset_px``: 0.5 px for torchvision-trained models, 0 for detectron2).
A mask decoding with a margin (``nanoseg.mask_decoding``) predicted the grid over the box grown by
``margin_px`` on every side, and it is pasted over that grown box.

With ``mask_rescoring`` an instance's score is its class score times its *maskness*, the mean mask
probability over the cells of its grid at or above ``mask_threshold`` (SOLOv2's rescoring): a
confident, crisp mask ranks above a blurry one of the same class score. The score threshold then
applies to the rescored score, which is also the score published and stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field
from scipy import ndimage

from nanoseg.config_io import StrictModel
from nanoseg.engines import RawDetections
from nanoseg.instances import BoxMasks, Instances
from nanoseg.mask_decoding import MaskDecoding


class NestedSuppression(StrictModel):
    """Drop an instance lying inside a larger one (a failure the paper reports on real images)."""

    enabled: bool = True
    containment: float = Field(0.85, gt=0, le=1)
    """Fraction of the smaller instance's area inside the larger one."""
    max_area_ratio: float = Field(0.5, gt=0, le=1)
    """Only when the smaller one is at most this fraction of the larger one's area."""


class PostprocessConfig(StrictModel):
    score_threshold: float = Field(0.5, ge=0, le=1)
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    min_area_px: int = Field(20, ge=0)
    """At the frame's resolution."""
    nested: NestedSuppression = NestedSuppression()
    mask_rescoring: bool = False
    """Score = class score x maskness (see the module docstring); the score threshold applies to it."""
    max_instances: int = Field(2000, ge=1)
    """Most instances kept per frame (the highest scores); the daemon counts the rest
    (``nanoseg_instances_dropped_total{reason="max_instances"}``)."""


class OperatingPoint(StrictModel):
    """A model's own thresholds, chosen on a validation set (``nanoseg calibrate``) and stored in
    its checkpoint (``meta["operating_point"]``)."""

    score_threshold: float = Field(ge=0, le=1)
    mask_threshold: float = Field(gt=0, lt=1)
    objective: str = "foreground_accuracy"
    value: float | None = None
    """The objective's value at this point on ``chosen_on``."""
    chosen_on: str = ""
    """The validation data set (not the test set)."""
    mask_rescoring: bool = False
    """The score threshold is on class score x maskness (``PostprocessConfig.mask_rescoring``)."""
    mask_decoding: MaskDecoding = MaskDecoding()
    """How the graph decodes detections and masks (margin, mask TTA, box refinement), chosen with
    the thresholds."""


def resolve_postprocess(configured: PostprocessConfig, point: OperatingPoint | None) -> PostprocessConfig:
    """The post-processing a model runs with.

    Defaults, then the model's operating point, then every field ``configured`` sets explicitly (a
    YAML key, a control ``set``, a CLI flag) on top.

    Parameters
    ----------
    configured : PostprocessConfig
        Its explicitly set fields (``model_fields_set``) win.
    point : OperatingPoint or None
        The model's stored thresholds and rescoring.

    Returns
    -------
    PostprocessConfig
    """
    if point is None:
        return configured
    base = {"score_threshold": point.score_threshold, "mask_threshold": point.mask_threshold,
            "mask_rescoring": point.mask_rescoring}
    return PostprocessConfig.model_validate({**base, **configured.model_dump(exclude_unset=True)})


def explicit_postprocess(**fields: float | bool | None) -> PostprocessConfig:
    """Post-processing with only the given fields set explicitly (CLI flags).

    Parameters
    ----------
    **fields : float, bool or None
        ``PostprocessConfig`` fields; None means "not given", so the model's operating point fills it.

    Returns
    -------
    PostprocessConfig

    Raises
    ------
    ValueError
        Naming a field out of range (a pydantic ``ValidationError``).
    """
    return PostprocessConfig.model_validate({k: v for k, v in fields.items() if v is not None})


def paste_mask(probs: np.ndarray, box: np.ndarray, shape: tuple[int, int], threshold: float,
               offset_px: float = 0.0, margin_px: float = 0.0) -> np.ndarray:
    """The full-frame binary mask of one detection.

    The M x M ``probs`` are stretched over ``box`` grown by ``margin_px`` on every side, the grid
    shifted by ``offset_px`` in x and y, sampled bilinearly at each pixel centre, and thresholded.

    Parameters
    ----------
    probs : ndarray, shape (M, M)
        Mask probabilities in [0, 1], rows along y.
    box : ndarray, shape (4,)
        xyxy px, pixel-edge coordinates, y down.
    shape : (int, int)
        Canvas (H, W) in px.
    threshold : float
        Probability at or above which a pixel is foreground.
    offset_px : float, optional
        The model's mask-grid offset in px (``nanoseg.model.mask_grid_offset_px``).
    margin_px : float, optional
        The box margin the grid was predicted on, px (``MaskDecoding.margin_px``).

    Returns
    -------
    ndarray, shape (H, W), bool
    """
    out = np.zeros(shape, dtype=bool)
    pasted = paste_crop(probs, box, shape, threshold, offset_px, margin_px)
    if pasted is not None:
        (r0, c0), crop = pasted
        out[r0:r0 + crop.shape[0], c0:c0 + crop.shape[1]] = crop
    return out


def paste_crop(probs: np.ndarray, box: np.ndarray, shape: tuple[int, int], threshold: float,
               offset_px: float = 0.0, margin_px: float = 0.0) -> tuple[tuple[int, int], np.ndarray] | None:
    """``paste_mask`` kept box-local: the pixels of the canvas the detection's grid can cover.

    Parameters
    ----------
    probs, box, shape, threshold, offset_px, margin_px
        As in :func:`paste_mask`.

    Returns
    -------
    ((int, int), ndarray) or None
        The window's top-left (row, column) on the canvas, px, and its bool mask (rows along y;
        it may have empty margins); None where the box covers no pixel centre.
    """
    win = paste_window(box, shape, probs.shape, offset_px, margin_px)
    if win is None:
        return None
    r0, _, c0, _ = win.rows_cols
    yy, xx = np.meshgrid(win.grid_y, win.grid_x, indexing="ij")
    vals = ndimage.map_coordinates(probs.astype(np.float32), [yy, xx], order=1, mode="grid-constant", cval=0.0)
    return (r0, c0), vals >= threshold


@dataclass(frozen=True)
class PasteWindow:
    """Where one detection's mask grid lands on the canvas (``paste_mask``'s pixel model).

    ``rows_cols``: (r0, r1, c0, c1), the canvas pixels whose centres the (grown, offset) box can
    cover, clipped to the canvas. Pixel (c, r) samples the grid at ``grid_x[c - c0]``,
    ``grid_y[r - r0]`` (cell units, cell centres at integers; zeros beyond the grid).
    """

    rows_cols: tuple[int, int, int, int]
    origin: tuple[float, float]
    """(x0, y0) of the grown, offset box, px."""
    size: tuple[float, float]
    """(width, height) of the grown box, px."""
    grid_shape: tuple[int, int]
    """The mask grid's (rows, columns)."""

    @property
    def grid_y(self) -> np.ndarray:
        """Grid row coordinate (cells) of each canvas row r0 .. r1 - 1's pixel centres."""
        r0, r1 = self.rows_cols[:2]
        return (np.arange(r0, r1) + 0.5 - self.origin[1]) / self.size[1] * self.grid_shape[0] - 0.5

    @property
    def grid_x(self) -> np.ndarray:
        """Grid column coordinate (cells) of each canvas column c0 .. c1 - 1's pixel centres."""
        c0, c1 = self.rows_cols[2:]
        return (np.arange(c0, c1) + 0.5 - self.origin[0]) / self.size[0] * self.grid_shape[1] - 0.5


def paste_window(box: np.ndarray, shape: tuple[int, int], grid_shape: tuple[int, ...], offset_px: float = 0.0,
                 margin_px: float = 0.0) -> PasteWindow | None:
    """The canvas window and grid coordinates of one detection (None when it covers no pixel).

    Parameters
    ----------
    box : ndarray, shape (4,)
        xyxy px, pixel-edge coordinates, y down.
    shape : (int, int)
        Canvas (H, W) in px.
    grid_shape : (int, int)
        The mask grid's (rows, columns).
    offset_px, margin_px : float, optional
        As in :func:`paste_mask`.

    Returns
    -------
    PasteWindow or None
    """
    h, w = shape
    x0, y0 = (float(v) + offset_px - margin_px for v in box[:2])
    x1, y1 = (float(v) + offset_px + margin_px for v in box[2:])
    bw, bh = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
    c0, c1 = max(math.floor(x0), 0), min(math.ceil(x1), w)
    r0, r1 = max(math.floor(y0), 0), min(math.ceil(y1), h)
    if c0 >= c1 or r0 >= r1:
        return None
    return PasteWindow((r0, r1, c0, c1), (x0, y0), (bw, bh), (int(grid_shape[0]), int(grid_shape[1])))


def maskness(mask_probs: np.ndarray, threshold: float) -> np.ndarray:
    """Mean mask probability of each grid over its foreground cells (SOLOv2's maskness).

    Parameters
    ----------
    mask_probs : ndarray, shape (N, M, M)
        Probabilities in [0, 1].
    threshold : float
        Cells at or above it are foreground.

    Returns
    -------
    ndarray, shape (N,), float64
        In [threshold, 1]; 0 for a grid without foreground cells.
    """
    probs = mask_probs.reshape(len(mask_probs), -1).astype(np.float64)
    fg = probs >= threshold
    n = fg.sum(axis=1)
    return np.divide((probs * fg).sum(axis=1), n, out=np.zeros(len(probs)), where=n > 0)


def instance_scores(raw: RawDetections, cfg: PostprocessConfig) -> np.ndarray:
    """Scores the thresholds and the published results use.

    Parameters
    ----------
    raw : RawDetections
    cfg : PostprocessConfig
        ``mask_rescoring`` and ``mask_threshold`` are read.

    Returns
    -------
    ndarray, shape (N,), float32
        Class scores in [0, 1], or class score x maskness with ``cfg.mask_rescoring``.
    """
    if not cfg.mask_rescoring or len(raw.scores) == 0:
        return raw.scores
    return (raw.scores * maskness(raw.mask_probs, cfg.mask_threshold)).astype(np.float32)


def to_instances(raw: RawDetections, shape: tuple[int, int], cfg: PostprocessConfig,
                 mask_offset_px: float = 0.0, mask_margin_px: float = 0.0) -> Instances:
    """Score threshold and mask pasting of one model input's detections.

    Parameters
    ----------
    raw : RawDetections
        Boxes in input px.
    shape : (int, int)
        Canvas (H, W) in px (the model input).
    cfg : PostprocessConfig
        ``score_threshold``, ``mask_threshold`` and ``mask_rescoring`` are applied.
    mask_offset_px, mask_margin_px : float, optional
        The model's mask grid offset and box margin, px, as in :func:`paste_mask`.

    Returns
    -------
    Instances
        The detections scoring at or above ``score_threshold``, in their order; masks box-local
        (``BoxMasks``), the same pixels as ``paste_mask`` gives.
    """
    scores = instance_scores(raw, cfg)
    keep = np.flatnonzero(scores >= cfg.score_threshold)
    if keep.size == 0:
        return Instances.empty(*shape)
    offsets: list[tuple[int, int]] = []
    crops: list[np.ndarray] = []
    for i in keep:  # box-local: no canvas-sized mask per detection
        pasted = paste_crop(raw.mask_probs[i], raw.boxes[i], shape, cfg.mask_threshold, mask_offset_px, mask_margin_px)
        offset, crop = pasted if pasted is not None else ((0, 0), np.zeros((0, 0), bool))
        offsets.append(offset)
        crops.append(crop)
    return Instances(raw.boxes[keep], scores[keep], BoxMasks.tight(shape, offsets, crops))


def nested_to_drop(masks: np.ndarray | BoxMasks, cfg: NestedSuppression) -> np.ndarray:
    """Instances lying inside a larger instance (box-local: only instances whose boxes overlap are
    compared, on their crops).

    Parameters
    ----------
    masks : ndarray, shape (N, H, W), bool, or BoxMasks
    cfg : NestedSuppression
        Instance i is dropped when its area is at most ``max_area_ratio`` times another's and at
        least ``containment`` of its pixels lie inside that other.

    Returns
    -------
    ndarray, shape (N,), bool
        True for the instances to drop; all False when disabled or N < 2.
    """
    bm = masks if isinstance(masks, BoxMasks) else BoxMasks.from_dense(masks)
    n = len(bm)
    drop = np.zeros(n, dtype=bool)
    if n < 2 or not cfg.enabled:
        return drop
    areas = bm.areas().astype(np.float64)
    b = bm.boxes()
    for i in range(n):
        if areas[i] == 0:
            continue
        x0, y0, x1, y1 = b[i]
        larger = np.flatnonzero((areas[i] <= cfg.max_area_ratio * areas) & (b[:, 0] < x1) & (b[:, 2] > x0)
                                & (b[:, 1] < y1) & (b[:, 3] > y0))
        rows, cols = slice(int(y0), int(y1)), slice(int(x0), int(x1))
        for j in larger:
            if j != i and np.count_nonzero(bm.crops[i] & bm.window(int(j), rows, cols)) >= cfg.containment * areas[i]:
                drop[i] = True
                break
    return drop


def cap_instances(inst: Instances, max_instances: int) -> tuple[Instances, int]:
    """The highest-scoring instances, at most ``max_instances`` of them.

    Parameters
    ----------
    inst : Instances
    max_instances : int

    Returns
    -------
    kept : Instances
        In their original order.
    dropped : int
        How many were left out.
    """
    if len(inst) <= max_instances:
        return inst, 0
    keep = np.sort(np.argsort(-inst.scores, kind="stable")[:max_instances])
    return inst.select(keep), len(inst) - max_instances


def filter_instances(inst: Instances, cfg: PostprocessConfig) -> Instances:
    """Frame-level filters: minimum area, then nested-instance suppression.

    Parameters
    ----------
    inst : Instances
    cfg : PostprocessConfig
        ``min_area_px`` (px, at least 1) and ``nested``.

    Returns
    -------
    Instances
        The kept instances sorted by descending score (stable).
    """
    if len(inst) == 0:
        return inst
    inst = inst.select(inst.box_masks.areas() >= max(cfg.min_area_px, 1))
    inst = inst.select(~nested_to_drop(inst.box_masks, cfg.nested))
    return inst.select(np.argsort(-inst.scores, kind="stable"))
