"""Binary masks <-> COCO run-length encoding (the one wire format for masks)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from pycocotools import mask as mask_utils

from nanoseg.instances import BoxMasks


class RLE(TypedDict):
    """COCO compressed RLE: ``size`` is [height, width]; ``counts`` the compressed string."""

    size: list[int]
    counts: str


class MaskDecodeError(ValueError):
    """An RLE could not be decoded (corrupt counts or size)."""


def encode_rle(mask: np.ndarray) -> RLE:
    """Encode one binary mask as COCO compressed RLE.

    Parameters
    ----------
    mask : ndarray, shape (H, W)
        Boolean (or 0/1) mask, row-major, y down.

    Returns
    -------
    RLE
        ``size`` [H, W] and the compressed ``counts`` string (column-major, as COCO).

    Raises
    ------
    ValueError
        If ``mask`` is not 2-D.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    enc = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))  # no copy if already so
    return {"size": [int(enc["size"][0]), int(enc["size"][1])], "counts": enc["counts"].decode("ascii")}


def encode_box_mask(crop: np.ndarray, offset: tuple[int, int], image_shape: tuple[int, int]) -> RLE:
    """COCO compressed RLE of an image-sized mask that is zero outside a crop, made without the image.

    The runs of the column-major image are those of the crop's columns with the rows outside the
    crop in between.

    Parameters
    ----------
    crop : ndarray, shape (h, w), bool
        The mask inside its box.
    offset : (int, int)
        (row, column) of the crop's top-left pixel on the image, px.
    image_shape : (int, int)
        Image (H, W) in px.

    Returns
    -------
    RLE
        ``size`` [H, W] and the compressed ``counts``.
    """
    h, w = image_shape
    hc, wc = crop.shape
    if crop.size == 0:
        counts = [h * w]
    else:
        y, x = offset
        values = np.zeros((hc + 1, wc), bool)
        values[:hc] = crop
        weights = np.ones((hc + 1, wc), np.int64)
        weights[hc] = h - hc  # below this column's crop, then above the next one's
        v = np.concatenate([[False], values.ravel(order="F")[:-1]])  # no gap after the last column
        wt = np.concatenate([[x * h + y], weights.ravel(order="F")[:-1]])
        v, wt = v[wt > 0], wt[wt > 0]
        starts = np.concatenate([[0], np.flatnonzero(v[1:] != v[:-1]) + 1])
        runs = np.add.reduceat(wt, starts).tolist()
        if v[0]:
            runs.insert(0, 0)  # counts start with a run of zeros
        tail = h * w - int(wt.sum())
        if not v[-1]:
            runs[-1] += tail
        elif tail:
            runs.append(tail)
        counts = [int(r) for r in runs]
    enc = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": enc["counts"].decode("ascii")}


def encode_rle_batch(masks: np.ndarray | BoxMasks) -> list[RLE]:
    """Encode a stack of binary masks as COCO compressed RLE.

    Parameters
    ----------
    masks : ndarray, shape (N, H, W), or BoxMasks
        Dense masks are encoded in one pycocotools call; box-local masks mask by mask, without an
        (H, W) image.

    Returns
    -------
    list of RLE
        One per mask, in order; empty for N = 0.

    Raises
    ------
    ValueError
        If dense ``masks`` are not 3-D.
    """
    if isinstance(masks, BoxMasks):
        return [encode_box_mask(c, (int(o[0]), int(o[1])), masks.image_shape)
                for o, c in zip(masks.offsets, masks.crops)]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    encs = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [
        {"size": [int(e["size"][0]), int(e["size"][1])], "counts": e["counts"].decode("ascii")}
        for e in encs
    ]


def decode_rle(rle: RLE | dict) -> np.ndarray:
    """Decode a COCO RLE to a binary mask.

    Parameters
    ----------
    rle : RLE or dict
        ``size`` [H, W] and ``counts``: a compressed string (or bytes) or an uncompressed list of
        run lengths (which must sum to H x W).

    Returns
    -------
    ndarray, shape (H, W), bool
        The mask, row-major, y down.

    Raises
    ------
    MaskDecodeError
        If the counts or the size are corrupt or disagree.
    """
    try:
        size = [int(v) for v in rle["size"]]
        counts = rle["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != size[0] * size[1]:
                raise MaskDecodeError("uncompressed RLE counts do not sum to height*width")
            obj = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
        else:
            obj = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        out = mask_utils.decode(obj)
    except MaskDecodeError:
        raise
    except Exception as err:  # pycocotools raises bare Exceptions/TypeErrors on bad input
        raise MaskDecodeError(f"corrupt RLE: {err}") from None
    if out.shape != (size[0], size[1]):
        raise MaskDecodeError(f"RLE decodes to {out.shape}, size says {tuple(size)}")
    return out.astype(bool)


def decode_segmentation(seg: dict | list, height: int, width: int) -> np.ndarray:
    """A COCO annotation's ``segmentation`` as a boolean mask.

    Parameters
    ----------
    seg : dict or list
        RLE (compressed or not, ``decode_rle``) or polygons ``[[x0, y0, x1, y1, ...], ...]`` in px
        (CVAT and labelme exports; pixel edges, as pycocotools rasterises them; several polygons
        are one mask's parts).
    height, width : int
        The image's size in px.

    Returns
    -------
    np.ndarray
        (height, width) bool.
    """
    if isinstance(seg, dict):
        return decode_rle(seg)
    try:
        polygons = [[float(v) for v in poly] for poly in seg]
        if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise MaskDecodeError("polygons need at least 3 (x, y) points each")
        out = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    except MaskDecodeError:
        raise
    except Exception as err:  # pycocotools raises bare Exceptions/TypeErrors on bad input
        raise MaskDecodeError(f"corrupt polygon: {err}") from None
    return np.asarray(out, dtype=bool)


def rle_area(rle: RLE) -> int:
    """Foreground pixel count of a compressed RLE.

    Parameters
    ----------
    rle : RLE
        ``size`` and compressed string ``counts``.

    Returns
    -------
    int
        Area in px.
    """
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO bounding box of a binary mask.

    Parameters
    ----------
    mask : ndarray, shape (H, W), bool

    Returns
    -------
    tuple of 4 float
        (x, y, width, height) in px: the top-left pixel's column and row and the extent in whole
        pixels; (0, 0, 0, 0) for an empty mask.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return (float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1))
