"""COCO RLE encoding and decoding of binary masks."""

from __future__ import annotations

import numpy as np
import pytest

from nanoseg.masks import (
    MaskDecodeError,
    decode_rle,
    encode_rle,
    encode_rle_batch,
    mask_bbox,
    rle_area,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def random_masks(n: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape)) < 0.3


def test_round_trip_keeps_every_pixel_and_orientation() -> None:
    for m in random_masks(5, (37, 53)):
        rle = encode_rle(m)
        assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
        out = decode_rle(rle)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, m)
    m = np.zeros((4, 6), bool)
    m[1, 4] = True  # row 1, column 4: not transposed by the column-major RLE
    assert np.argwhere(decode_rle(encode_rle(m))).tolist() == [[1, 4]]


def test_batch_encoding_equals_one_by_one() -> None:
    masks = random_masks(4, (20, 30), seed=1)
    assert encode_rle_batch(masks) == [encode_rle(m) for m in masks]
    assert encode_rle_batch(np.zeros((0, 20, 30), bool)) == []
    with pytest.raises(ValueError, match="N, H, W"):
        encode_rle_batch(masks[0])
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(masks)


def test_uncompressed_counts_are_decoded() -> None:
    # Column-major runs: 3 zeros, 2 ones, 7 zeros in a 3 x 4 mask -> pixels (0,1) and (1,1).
    out = decode_rle({"size": [3, 4], "counts": [3, 2, 7]})
    assert np.argwhere(out).tolist() == [[0, 1], [1, 1]]
    with pytest.raises(MaskDecodeError, match="sum to height"):
        decode_rle({"size": [3, 4], "counts": [3, 2, 6]})


@pytest.mark.parametrize("rle", [{"size": [3, 4]}, {"counts": "abc"}, {"size": [3, "x"], "counts": "0"}])
def test_corrupt_rle_raises_mask_decode_error(rle: dict) -> None:
    with pytest.raises(MaskDecodeError):
        decode_rle(rle)


def test_area_and_bbox() -> None:
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    m[7, 10] = True
    assert rle_area(encode_rle(m)) == 3 * 6 + 1
    assert mask_bbox(m) == (3.0, 2.0, 8.0, 6.0)  # x, y, width, height (x 3..10, y 2..7)
    assert mask_bbox(np.zeros((3, 3), bool)) == (0.0, 0.0, 0.0, 0.0)
