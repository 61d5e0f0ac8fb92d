"""Image files read as 2-D frames: PNG, TIFF (8/16-bit, float) and ``.npy``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from nanoseg.config_io import ConfigError

EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
"""PIL modes of 8-bit-per-channel images: the only ones ``read_gray8`` converts to 0-255 gray."""


class UnreadableImage(ConfigError):
    """A file that is no readable 2-D image; the message names the file and why.

    A ``ConfigError``: the ``nanoseg`` CLI reports it as one line and exits 2."""


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
                # Palette images: the gray the file shows, not the palette indices.
                arr = np.asarray(im.convert("L") if im.mode in ("P", "PA") else im)
    except Exception as err:  # each reader raises its own family of errors
        raise UnreadableImage(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise UnreadableImage(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr


def read_gray8(path: Path) -> np.ndarray:
    """An 8-bit image file as (H, W) float32 0-255 gray (colour and palette images: luminance).

    The generator's data sets are 8-bit gray PNGs at the model's scale; other files need a
    frame profile (``read_image`` and ``prepare``).

    Raises
    ------
    UnreadableImage
        If the file cannot be read, or is not 8-bit (16-bit, 32-bit or float): PIL would clip it
        to 0/255, so a profile must say how to map it to gray.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in EIGHT_BIT_MODES:
                raise UnreadableImage(f"{path}: {im.mode} image, not 8-bit: set a frame profile (data.profile "
                                      f"for training, --profile for evaluate) to read it")
            return np.asarray(im.convert("L"), dtype=np.float32)
    except UnreadableImage:
        raise
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for broken files
        raise UnreadableImage(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
