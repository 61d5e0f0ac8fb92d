"""Binary masks <-> COCO run-length encoding (the one wire format for masks)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from pycocotools import mask as mask_utils


class RLE(TypedDict):
    """COCO compressed RLE: ``size`` is [height, width]; ``counts`` the compressed string."""

    size: list[int]
    counts: str


class MaskDecodeError(ValueError):
    """An RLE could not be decoded (corrupt counts or size)."""


def encode_rle(mask: np.ndarray) -> RLE:
    """Encode a 2-D boolean mask (row-major, y down) as COCO compressed RLE."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    enc = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))  # no copy if already so
    return {"size": [int(enc["size"][0]), int(enc["size"][1])], "counts": enc["counts"].decode("ascii")}


def encode_rle_batch(masks: np.ndarray) -> list[RLE]:
    """Encode (N, H, W) boolean masks; one pycocotools call for the whole stack."""
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
    """Decode COCO RLE (compressed string or uncompressed list counts) to a boolean (H, W) mask."""
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
    """A COCO annotation's ``segmentation`` as a boolean (H, W) mask: RLE (compressed or not,
    ``decode_rle``) or polygons ``[[x0, y0, x1, y1, ...], ...]`` in px (CVAT and labelme exports;
    pixel edges, as pycocotools rasterises them; several polygons are one mask's parts)."""
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
    """Foreground pixel count of an RLE, px."""
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO bbox [x, y, width, height] in px of a boolean mask (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return (float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1))
