"""Image files read as 2-D frames: PNG, TIFF (8/16-bit, float) and ``.npy``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


class UnreadableImage(ValueError):
    """A file that is no readable 2-D image; the message names the file and why."""


def read_image(path: Path) -> np.ndarray:
    """A 2-D array from PNG/TIFF/NPY (colour images are averaged to gray).

    Parameters
    ----------
    path : Path
        The image file.

    Returns
    -------
    np.ndarray
        (H, W) in the file's own dtype and units (colour: float mean of R, G, B).

    Raises
    ------
    UnreadableImage
        If the file cannot be read or is not a 2-D (or colour) image.
    """
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as err:  # each reader raises its own family of errors
        raise UnreadableImage(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise UnreadableImage(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr
