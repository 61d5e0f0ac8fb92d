"""Post-processing on the engine's device (torch): scores, thresholds and mask pasting into
box-local crops, and per-particle moment statistics, so that on a GPU only results cross to the
host.

The CPU path stays numpy (``nanoseg.postprocess``, ``nanoseg.particle_stats``); this module
follows its definitions rather than restating them: the paste window and grid coordinates are
``postprocess.paste_window``'s formula (evaluated here for all detections at once), the mask is
sampled bilinearly with zeros beyond the grid and thresholded as ``paste_mask`` does, maskness is
``postprocess.maskness``, and the moment figures come from ``particle_stats.moment_figures``.
``tests/nanoseg/test_device_postprocess.py`` holds the two paths together on the CPU device with
the tests' trained model. Runs on any torch device; ``Segmenter`` uses it where the engine runs
on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nanoseg.instances import BoxMasks, Instances
from nanoseg.particle_stats import moment_figures
from nanoseg.postprocess import PostprocessConfig, paste_window


@dataclass(frozen=True)
class DeviceDetections:
    """Detections of one model input on the engine's device: boxes (K, 4) xyxy px, scores (K,),
    mask_probs (K, M, M) (``engines.RawDetections``, not copied to the host)."""

    boxes: Tensor
    scores: Tensor
    mask_probs: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def split_device_outputs(boxes: Tensor, scores: Tensor, mask_probs: Tensor, num: Tensor) -> list[DeviceDetections]:
    """``engines.split_outputs`` on the device: the graph's padded (B, K, ...) outputs -> one
    ``DeviceDetections`` per image (only ``num``, B integers, crosses to the host)."""
    return [DeviceDetections(boxes[b, :n], scores[b, :n], mask_probs[b, :n])
            for b, n in enumerate(num.tolist())]  # fmt: skip


def maskness(mask_probs: Tensor, threshold: float) -> Tensor:
    """``postprocess.maskness`` on the device: mean probability over each grid's cells at or above
    ``threshold`` (0 without any), float64 (K,)."""
    probs = mask_probs.reshape(mask_probs.shape[0], -1).to(torch.float64)
    fg = probs >= threshold
    n = fg.sum(dim=1)
    total = (probs * fg).sum(dim=1)
    return torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))


def instance_scores(det: DeviceDetections, cfg: PostprocessConfig) -> Tensor:
    """``postprocess.instance_scores`` on the device (float32 (K,))."""
    if not cfg.mask_rescoring or len(det) == 0:
        return det.scores.to(torch.float32)
    return (det.scores.to(torch.float64) * maskness(det.mask_probs, cfg.mask_threshold)).to(torch.float32)


@dataclass(frozen=True)
class DeviceMasks:
    """K box-local masks on a device: ``crops`` (K, Hmax, Wmax) bool, crop k valid in its top-left
    ``heights[k]`` x ``widths[k]`` (zeros beyond); ``rows``, ``cols`` (K,) int64: each crop's
    top-left on an ``image_shape`` canvas (y down)."""

    crops: Tensor
    rows: Tensor
    cols: Tensor
    heights: Tensor
    widths: Tensor
    image_shape: tuple[int, int]

    @classmethod
    def from_host(cls, masks: BoxMasks, device: str | torch.device) -> DeviceMasks:
        """Numpy box-local masks padded into one (K, Hmax, Wmax) tensor on ``device``."""
        hs = [c.shape[0] for c in masks.crops]
        ws = [c.shape[1] for c in masks.crops]
        crops = np.zeros((len(hs), max(hs, default=0), max(ws, default=0)), bool)
        for k, c in enumerate(masks.crops):
            crops[k, :c.shape[0], :c.shape[1]] = c
        as_long = lambda v: torch.as_tensor(np.asarray(v, np.int64).reshape(-1), device=device)  # noqa: E731
        return cls(torch.from_numpy(crops).to(device), as_long(masks.offsets[:, 0]), as_long(masks.offsets[:, 1]),
                   as_long(hs), as_long(ws), masks.image_shape)

    def to_host(self) -> BoxMasks:
        """The masks as numpy ``BoxMasks`` cut to their foreground (one copy of the crops)."""
        crops = self.crops.cpu().numpy()
        hs, ws = self.heights.tolist(), self.widths.tolist()
        offsets = list(zip(self.rows.tolist(), self.cols.tolist()))
        return BoxMasks.tight(self.image_shape, offsets, [crops[k, :hs[k], :ws[k]] for k in range(len(hs))])


def paste_masks(mask_probs: Tensor, boxes: Tensor, shape: tuple[int, int], threshold: float,
                offset_px: float = 0.0, margin_px: float = 0.0) -> DeviceMasks:
    """``postprocess.paste_mask`` of K detections at once, kept box-local, on their device.

    Parameters
    ----------
    mask_probs : Tensor, shape (K, M, M)
        Probabilities in [0, 1].
    boxes : Tensor, shape (K, 4)
        xyxy px, pixel-edge coordinates, y down.
    shape : (int, int)
        Canvas (H, W) in px.
    threshold, offset_px, margin_px : float
        As in ``paste_mask``.

    Returns
    -------
    DeviceMasks
        Each crop covers ``paste_window``'s window (empty where the box covers no pixel).
    """
    dev = mask_probs.device
    k = mask_probs.shape[0]
    # the windows and grid coordinates are paste_window's (K small vectors, computed on the host
    # from the boxes, which come to the host anyway); the K x H x W sampling runs on the device
    wins = [paste_window(box, shape, tuple(mask_probs.shape[1:]), offset_px, margin_px)
            for box in boxes.to(torch.float32).cpu().numpy()]  # fmt: skip
    spans = [(0, 0, 0, 0) if win is None else win.rows_cols for win in wins]
    hs = [r1 - r0 for r0, r1, _, _ in spans]
    ws = [c1 - c0 for _, _, c0, c1 in spans]
    hmax, wmax = max(hs, default=0), max(ws, default=0)
    as_long = lambda v: torch.as_tensor(v, dtype=torch.long, device=dev)  # noqa: E731
    rows, cols = as_long([s[0] for s in spans]), as_long([s[2] for s in spans])
    if hmax == 0 or wmax == 0:
        return DeviceMasks(torch.zeros((k, 0, 0), dtype=torch.bool, device=dev), rows, cols, as_long(hs),
                           as_long(ws), shape)
    gy, gx = np.full((k, hmax), np.inf), np.full((k, wmax), np.inf)  # beyond a window: no grid, zero
    for i, win in enumerate(wins):
        if win is not None:
            gy[i, :hs[i]], gx[i, :ws[i]] = win.grid_y, win.grid_x
    vals = _bilinear_zero_padded(mask_probs.to(torch.float64), torch.from_numpy(gy).to(dev),
                                 torch.from_numpy(gx).to(dev))
    # float32 before the threshold, as paste_mask's map_coordinates returns the grid's float32
    return DeviceMasks(vals.to(torch.float32) >= threshold, rows, cols, as_long(hs), as_long(ws), shape)


def _bilinear_zero_padded(grid: Tensor, gy: Tensor, gx: Tensor) -> Tensor:
    """grid (K, M, N) sampled at (gy[k, i], gx[k, j]) (cell units, centres at integers), linear in
    each axis, zeros beyond the grid (``map_coordinates(order=1, mode="grid-constant")``)."""
    k, m, n = grid.shape
    gy, gx = gy.clamp(-2.0, m + 1.0), gx.clamp(-2.0, n + 1.0)  # beyond the grid's reach: zero either way
    yf, xf = torch.floor(gy), torch.floor(gx)
    ty, tx = gy - yf, gx - xf
    yi, xi = yf.long(), xf.long()
    flat = grid.reshape(k, m * n)
    out = torch.zeros((k, gy.shape[1], gx.shape[1]), dtype=grid.dtype, device=grid.device)
    for dy, wy in ((0, 1 - ty), (1, ty)):
        ry = yi + dy
        vy = (ry >= 0) & (ry < m)
        for dx, wx in ((0, 1 - tx), (1, tx)):
            cx = xi + dx
            vx = (cx >= 0) & (cx < n)
            idx = ry.clamp(0, m - 1)[:, :, None] * n + cx.clamp(0, n - 1)[:, None, :]
            v = torch.gather(flat, 1, idx.reshape(k, -1)).reshape(idx.shape)
            out += v * (wy[:, :, None] * wx[:, None, :]) * (vy[:, :, None] & vx[:, None, :])
    return out


def to_instances(det: DeviceDetections, shape: tuple[int, int], cfg: PostprocessConfig,
                 mask_offset_px: float = 0.0, mask_margin_px: float = 0.0) -> Instances:
    """``postprocess.to_instances`` with the scores, the threshold and the pasting on the device;
    boxes, scores and box-local masks of the kept detections come to the host."""
    scores = instance_scores(det, cfg)
    keep = torch.nonzero(scores >= cfg.score_threshold).flatten()
    if keep.numel() == 0:
        return Instances.empty(*shape)
    masks = paste_masks(det.mask_probs[keep], det.boxes[keep], shape, cfg.mask_threshold, mask_offset_px,
                        mask_margin_px)
    return Instances(det.boxes[keep].to(torch.float32).cpu().numpy(), scores[keep].cpu().numpy(), masks.to_host())


def moment_columns(masks: DeviceMasks) -> dict[str, np.ndarray]:
    """Per-particle moment columns of ``particle_stats.particle_table`` computed on the device.

    Returns ``area_px``, ``centroid_x``, ``centroid_y`` (px, pixel-edge coordinates),
    ``major_px``, ``minor_px``, ``orientation_deg``, ``eccentricity`` (``moment_figures``),
    ``bbox_width_px``, ``bbox_height_px`` and ``touches_edge`` as host numpy arrays (N,); NaN (False)
    for an empty mask. Second moments about the centroid in float64, pixel centres.
    """
    crops = masks.crops
    k = crops.shape[0]
    if k == 0 or crops.shape[1] == 0:
        return {}
    dev = crops.device
    f = crops.to(torch.float64)
    ys = torch.arange(crops.shape[1], device=dev, dtype=torch.float64)[None, :, None]
    xs = torch.arange(crops.shape[2], device=dev, dtype=torch.float64)[None, None, :]
    area = f.sum(dim=(1, 2))
    n = area.clamp(min=1)
    cy, cx = (f * ys).sum(dim=(1, 2)) / n, (f * xs).sum(dim=(1, 2)) / n
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    cxx, cyy, cxy = (f * dx * dx).sum(dim=(1, 2)) / n, (f * dy * dy).sum(dim=(1, 2)) / n, (f * dx * dy).sum(dim=(1, 2)) / n
    # eigen-decomposition of [[cxx, cxy], [cxy, cyy]] in closed form
    mid, rad = (cxx + cyy) / 2, torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy**2)
    l1, l2 = (mid + rad).clamp(min=0), (mid - rad).clamp(min=0)
    # the major eigenvector; without correlation the larger axis, y when equal (as eigh's identity)
    vx = torch.where(cxy != 0, l1 - cyy, torch.where(cxx > cyy, torch.ones_like(cxx), torch.zeros_like(cxx)))
    vy = torch.where(cxy != 0, cxy, torch.where(cxx > cyy, torch.zeros_like(cxx), torch.ones_like(cxx)))
    any_row, any_col = crops.any(dim=2), crops.any(dim=1)
    r_first = torch.argmax(any_row.to(torch.uint8), dim=1)
    r_last = crops.shape[1] - 1 - torch.argmax(any_row.flip(1).to(torch.uint8), dim=1)
    c_first = torch.argmax(any_col.to(torch.uint8), dim=1)
    c_last = crops.shape[2] - 1 - torch.argmax(any_col.flip(1).to(torch.uint8), dim=1)
    top, left = masks.rows + r_first, masks.cols + c_first
    bottom, right = masks.rows + r_last + 1, masks.cols + c_last + 1
    h, w = masks.image_shape
    host = {name: t.cpu().numpy() for name, t in {
        "area": area, "cx": cx + masks.cols, "cy": cy + masks.rows, "l1": l1, "l2": l2, "vx": vx, "vy": vy,
        "bw": (right - left).to(torch.float64), "bh": (bottom - top).to(torch.float64),
        "edge": (top == 0) | (left == 0) | (bottom == h) | (right == w)}.items()}  # fmt: skip
    empty = host["area"] == 0
    figs = [moment_figures(*v) for v in zip(*(host[c].tolist() for c in ("l1", "l2", "vx", "vy")))]
    fig = {name: np.array([f[name] for f in figs]) for name in figs[0]}
    out = {"area_px": host["area"], "centroid_x": host["cx"] + 0.5, "centroid_y": host["cy"] + 0.5, **fig,
           "bbox_width_px": host["bw"], "bbox_height_px": host["bh"]}
    out = {name: np.where(empty, math.nan, v) for name, v in out.items()}
    out["touches_edge"] = host["edge"] & ~empty
    return out
