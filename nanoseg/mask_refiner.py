"""Mask refinement from the image: the mask head's coarse grid sharpened at twice its resolution.

The mask head predicts an M x M grid (28 x 28) from pooled FPN features. For a thin wire lying
diagonally in a 200 px box a cell is 7 px, near the wire's width, and the features it reads are
coarser still, so the masks lose most of their points along the wire's edges and ends. The image
itself shows those edges. ``MaskRefiner`` reads, for each detection, the input image sampled on an
S x S grid over the (grown) box and the coarse grid upsampled to S x S, and predicts a correction
of the coarse logits (a small dilated CNN; zero-initialised output, so an untrained refiner
returns the coarse masks).

Grid convention: the S x S image crop is ``roi_align(image, box, S, aligned=False)``, the
convention of torchvision's mask targets, so cell (i, j) of the refined grid sits where the mask
paste (``nanoseg.postprocess.paste_mask``, offset ``mask_grid_offset_px``) puts it; the coarse grid
is upsampled bilinearly with cell centres kept (``align_corners=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torchvision.ops import roi_align

from nanoseg.config_io import StrictModel

_EPS = 1e-4


class MaskRefinerConfig(StrictModel):
    """The refiner's shape. ``size``: output grid S (cells per box side); ``dilations``: one 3x3
    conv of ``channels`` per entry, after a first 3x3 conv from the two inputs."""

    size: int = Field(56, ge=14, le=112)
    channels: int = Field(32, ge=4, le=128)
    dilations: tuple[int, ...] = (1, 2, 4, 1)
    box_size_input: bool = True
    """Also read the px per cell in x and y (log), so the net knows how stretched the grid is."""


class MaskRefiner(nn.Module):
    """(N, 1, S, S) normalised image crops + (N, M, M) coarse probabilities + (N, 4) xyxy px boxes
    they cover -> (N, S, S) logits."""

    def __init__(self, cfg: MaskRefinerConfig) -> None:
        super().__init__()
        self.size = cfg.size
        self.box_size_input = cfg.box_size_input
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(4 if cfg.box_size_input else 2, c, 3, padding=1), nn.ReLU(inplace=True)]
        for d in cfg.dilations:
            layers += [nn.Conv2d(c, c, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]  # Conv2d(bias=True) has one

    def forward(self, crops: Tensor, coarse: Tensor, boxes: Tensor) -> Tensor:
        """Refined mask logits of N detections.

        Parameters
        ----------
        crops : Tensor, shape (N, 1, S, S)
            The input image over each (grown) box (:func:`image_crops`), 0–255.
        coarse : Tensor, shape (N, M, M)
            The mask head's probabilities.
        boxes : Tensor, shape (N, 4)
            The boxes the masks are pasted on, xyxy px (their size in px per cell is an input).

        Returns
        -------
        Tensor, shape (N, S, S)
            Logits: the upsampled coarse logits plus the predicted correction.
        """
        s = self.size
        up, prior = upsampled(coarse, s)
        inputs = [crops, up[:, None] * 2 - 1]
        if self.box_size_input:
            cell = torch.log((boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0) / s)  # (N, 2): log px per cell
            inputs.append(cell[:, :, None, None].expand(-1, -1, s, s))
        delta = self.out(self.body(torch.cat(inputs, 1)))
        return prior + delta[:, 0]


def upsampled(coarse: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Coarse mask probabilities on the refiner's grid: what an untrained refiner returns.

    Parameters
    ----------
    coarse : Tensor, shape (N, M, M)
        Probabilities in [0, 1].
    size : int
        S, the refined grid's side.

    Returns
    -------
    probs : Tensor, shape (N, S, S)
        Bilinear, cell centres kept (``align_corners=False``), clamped away from 0 and 1.
    logits : Tensor, shape (N, S, S)
        Their logits.
    """
    up = F.interpolate(coarse[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp(_EPS, 1 - _EPS)
    return up, torch.log(up) - torch.log(1 - up)  # logit, written with ops every exporter has


def image_crops(image: Tensor, boxes: list[Tensor], size: int) -> Tensor:
    """The image over each box, in the mask targets' ROIAlign convention (``aligned=False``).

    Parameters
    ----------
    image : Tensor, shape (B, 1, H, W)
        Model inputs, 0–255.
    boxes : list of Tensor, shape (N_b, 4)
        Per image, the xyxy px boxes the masks are pasted on.
    size : int
        S, the crop side in cells.

    Returns
    -------
    Tensor, shape (sum N_b, 1, S, S)
    """
    return roi_align(image[:, :1], boxes, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=False)
