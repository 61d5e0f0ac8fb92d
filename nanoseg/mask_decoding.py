"""How detections and their M x M mask grids are decoded: box margin, mask TTA, box refinement.

Three inference-time choices, made on a validation set (``nanoseg calibrate``) and stored with the
model (``OperatingPoint.mask_decoding``); the graph (``DetectionCore``) and the mask pasting
(``nanoseg.postprocess.paste_mask``) must use the same ones:

* ``margin_px``: the mask head runs on the detected box grown by this many px on every side, and
  its grid is pasted over that grown box. The head under-predicts at the border of its window
  (it learned on proposals that mostly enclose their wire), so the edges and ends of a wire that
  touch its own box come out cut; a margin of about a pixel moves them inside the window.
* ``tta``: the mask head also runs on flipped and transposed copies of the image (the first 2, 4
  or 8 of ``VIEWS``, the symmetries of the square); each prediction is mapped back to the image's
  orientation and the probabilities are averaged. Detections (boxes, class scores) come from the
  image as it is, unless
* ``refine_boxes``: the box head runs again on each detection in every view, and its refined
  boxes, mapped back, are averaged; passes after the first start from the boxes the one before
  gave (iterative box refinement). The class scores are those of the first pass (the box head on
  the detector's own boxes), averaged over the views. Masks are then predicted on the refined
  boxes. Each pass costs one box-head run per view.

The backbone runs ``tta`` times.

Coordinates: boxes xyxy in px at model scale, in the model's pixel convention: a
torchvision-trained model addresses pixel centres at integers (its mask grid offset is 0.5 px,
``nanoseg.model.mask_grid_offset_px``), so mirroring a W px wide image maps x to W - 1 - x; a
detectron2 model addresses pixel edges (offset 0), x to W - x.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationError
from torch import Tensor

from nanoseg.config_io import StrictModel

View = tuple[bool, bool, bool]
"""(transpose, flip left-right, flip up-down), applied in that order."""

VIEWS: tuple[View, ...] = (
    (False, False, False), (False, True, False), (False, False, True), (False, True, True),
    (True, False, False), (True, True, False), (True, False, True), (True, True, True),
)


class MaskDecoding(StrictModel):
    """The decoding a graph runs (module docstring); the plain one is the network's own output."""

    margin_px: float = Field(0.0, ge=0, le=16)
    """Grow each detected box by this much on every side before predicting its mask, px."""
    tta: Literal[1, 2, 4, 8] = 1
    """Views averaged: 1 the image alone; 2 and its left-right mirror; 4 and the up-down mirrors;
    8 and the transposes."""
    refine_boxes: int = Field(0, ge=0, le=3)
    """Box-head passes over the detections in every view (0: the detector's boxes and scores)."""

    @property
    def is_plain(self) -> bool:
        """The network's own detections and masks, nothing recomputed."""
        return self.margin_px == 0 and self.tta == 1 and not self.refine_boxes

    def describe(self) -> str:
        """One phrase for cards and reports.

        Returns
        -------
        str
            E.g. "boxes refined by 2 passes of the box head, masks predicted on boxes grown by 1 px", or
            "the network's own boxes and masks" for the plain decoding.
        """
        if self.is_plain:
            return "the network's own boxes and masks"
        passes = f"{self.refine_boxes} passes of " if self.refine_boxes > 1 else ""
        views = " in every view" if self.tta > 1 else ""
        parts = [f"boxes refined by {passes}the box head{views}"] if self.refine_boxes else []
        if self.margin_px:
            parts.append(f"masks predicted on boxes grown by {self.margin_px:g} px")
        if self.tta > 1:
            parts.append(f"masks averaged over {self.tta} flipped/transposed views")
        return ", ".join(parts)


METADATA_KEY = "nanoseg.mask_decoding"
"""The ONNX metadata_props key of the decoding an exported graph runs."""


def decoding_from_metadata(metadata: dict[str, str], source: str = "<graph>") -> MaskDecoding:
    """The mask decoding an exported graph was built with, from its metadata.

    Parameters
    ----------
    metadata : dict of str to str
        The ONNX file's metadata properties.
    source : str, optional
        Where the graph came from (a file path), for error messages.

    Returns
    -------
    MaskDecoding
        The plain decoding when the metadata names none (files exported before decodings existed).

    Raises
    ------
    ValueError
        If the ``nanoseg.mask_decoding`` entry is not a valid decoding (not JSON, an unknown or
        out-of-range field); one line naming ``source``, the key and the field.
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return MaskDecoding()
    try:
        return MaskDecoding.model_validate_json(raw)
    except ValidationError as err:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{source}: metadata {METADATA_KEY} is not a valid mask decoding ({detail})") from None


def with_decoding(decoding: MaskDecoding, margin_px: float | None = None, tta: int | None = None,
                  refine_boxes: int | None = None) -> MaskDecoding:
    """A decoding with some fields replaced.

    Parameters
    ----------
    decoding : MaskDecoding
    margin_px : float, optional
        Box margin in px on every side.
    tta : int, optional
        Number of views (1, 2, 4 or 8).
    refine_boxes : int, optional
        Box-refinement passes.

    Returns
    -------
    MaskDecoding
        ``decoding`` with the fields that are not None replaced.

    Raises
    ------
    ValueError
        Naming a field whose value is out of range.
    """
    updates = {k: v for k, v in (("margin_px", margin_px), ("tta", tta), ("refine_boxes", refine_boxes))
               if v is not None}
    return MaskDecoding.model_validate({**decoding.model_dump(), **updates}) if updates else decoding


def grow_boxes(boxes: Tensor, margin_px: float) -> Tensor:
    """Boxes grown by a margin on every side.

    Parameters
    ----------
    boxes : Tensor, shape (N, 4)
        xyxy px.
    margin_px : float
        Margin in px added on each side.

    Returns
    -------
    Tensor, shape (N, 4)
        (x0 - m, y0 - m, x1 + m, y1 + m); not clipped to the image.
    """
    if margin_px == 0:
        return boxes
    return boxes + boxes.new_tensor([-margin_px, -margin_px, margin_px, margin_px])


def view_image(x: Tensor, view: View) -> Tensor:
    """Images as seen in a view (transpose, then left-right flip, then up-down flip).

    Parameters
    ----------
    x : Tensor, shape (..., H, W)
    view : View

    Returns
    -------
    Tensor, shape (..., H, W), or (..., W, H) when the view transposes
    """
    t, h, v = view
    if t:
        x = x.transpose(-1, -2)
    if h:
        x = x.flip(-1)
    if v:
        x = x.flip(-2)
    return x


def view_size(hw: tuple[int, int], view: View) -> tuple[int, int]:
    """Size of an image as seen in a view.

    Parameters
    ----------
    hw : (int, int)
        (H, W) in px.
    view : View

    Returns
    -------
    (int, int)
        (H, W) in the view: swapped when it transposes.
    """
    return (hw[1], hw[0]) if view[0] else hw


def view_boxes(boxes: Tensor, hw: tuple[int, int], view: View, offset_px: float) -> Tensor:
    """Boxes of an image in the coordinates of one of its views.

    Parameters
    ----------
    boxes : Tensor, shape (N, 4)
        xyxy px of the image, y down.
    hw : (int, int)
        Image (H, W) in px.
    view : View
    offset_px : float
        The model's pixel convention (``nanoseg.model.mask_grid_offset_px``): a torchvision model
        mirrors x to W - 1 - x, which a box mirror must follow.

    Returns
    -------
    Tensor, shape (N, 4)
        xyxy px in the view.
    """
    t, h, v = view
    x0, y0, x1, y1 = boxes.unbind(-1)
    height, width = view_size(hw, view)
    if t:
        x0, y0, x1, y1 = y0, x0, y1, x1
    if h:
        x0, x1 = (width - 2 * offset_px) - x1, (width - 2 * offset_px) - x0
    if v:
        y0, y1 = (height - 2 * offset_px) - y1, (height - 2 * offset_px) - y0
    return torch.stack([x0, y0, x1, y1], -1)


def unview_boxes(boxes: Tensor, hw: tuple[int, int], view: View, offset_px: float) -> Tensor:
    """Boxes in the coordinates of a view mapped back to the image (the inverse of :func:`view_boxes`).

    Parameters
    ----------
    boxes : Tensor, shape (N, 4)
        xyxy px in the view.
    hw : (int, int)
        Image (H, W) in px (not the view's).
    view : View
    offset_px : float
        The model's pixel convention, as for :func:`view_boxes`.

    Returns
    -------
    Tensor, shape (N, 4)
        xyxy px of the image.
    """
    t, h, v = view
    x0, y0, x1, y1 = boxes.unbind(-1)
    height, width = view_size(hw, view)
    if v:
        y0, y1 = (height - 2 * offset_px) - y1, (height - 2 * offset_px) - y0
    if h:
        x0, x1 = (width - 2 * offset_px) - x1, (width - 2 * offset_px) - x0
    if t:
        x0, y0, x1, y1 = y0, x0, y1, x1
    return torch.stack([x0, y0, x1, y1], -1)


def unview_grids(grids: Tensor, view: View) -> Tensor:
    """Mask grids predicted in a view mapped back to the image's orientation.

    Parameters
    ----------
    grids : Tensor, shape (N, M, M)
        Rows along the view's y.
    view : View

    Returns
    -------
    Tensor, shape (N, M, M)
        Rows along the image's y.
    """
    t, h, v = view
    if v:
        grids = grids.flip(-2)
    if h:
        grids = grids.flip(-1)
    if t:
        grids = grids.transpose(-1, -2)
    return grids

