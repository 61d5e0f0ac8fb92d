"""Images of any contrast and size scored as frames: ``nanoseg evaluate --profile``.

Each image file of a COCO set is prepared as the daemon prepares a frame (``Segmenter.prepare`` with
a profile: input check, conversion, resampling, tiles) and segmented; what the preparation found
(the input check, the pixel size chosen) goes with each image's measures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from nanoseg.errors import FrameError
from nanoseg.frame_profile import FrameProfile
from nanoseg.instances import Instances
from nanoseg.prepare import PreparedFrame
from nanoseg.segmenter import Segmenter


def iter_prepared_predictions(segmenter: Segmenter, profile: FrameProfile, dataset_dir: str | Path,
                              coco: dict[str, Any], pixel_size: float | Literal["auto"] | None = None,
                              limit: int | None = None, progress: bool = True, max_instances: int | None = None
                              ) -> Iterator[tuple[int, Instances, dict[str, Any]]]:
    """(image id, Instances, how it was prepared) for image files of any contrast and size,
    each prepared as the daemon prepares a frame (``Segmenter.prepare`` with ``profile``). A frame
    the profile cannot prepare (``FrameError``) counts as found empty, its reason in the record.
    ``max_instances``: the best-scored instances per image only (``Segmenter.segment_prepared``)."""
    from nanoseg_training.image_files import read_image

    root = Path(dataset_dir)
    images = sorted(coco["images"], key=lambda im: int(im["id"]))[:limit]
    for im in tqdm(images, desc="evaluate", unit="img", disable=not progress):
        try:
            prepared = segmenter.prepare(read_image(root / im["file_name"]), profile, pixel_size_nm=pixel_size)
        except FrameError as err:
            yield (int(im["id"]), Instances.empty(int(im["height"]), int(im["width"])),
                   {"frame_error": err.reason})
            continue
        found = segmenter.segment_prepared(prepared, max_instances=max_instances)
        yield int(im["id"]), found, {"frame_error": None, **preparation_record(prepared)}


def preparation_record(prepared: PreparedFrame) -> dict[str, Any]:
    """How a frame was prepared, flat for a CSV row or a JSON summary: its input check, the pixel
    size used (nm), with ``auto`` the objects' width measured (frame px) and the scale, and the
    pixels replaced in conversion per kind (``invalid_nan``, ``invalid_inf``, ...; see
    ``InvalidPixels``) with their total ``invalid_pixels``."""
    check, auto = prepared.input_check, prepared.auto_scale
    return {"looks_like": check.looks_like if check else None,
            "input_used": check.used if check else None,
            "input_mismatch": bool(check and check.mismatch),
            "pixel_size_nm": None if prepared.pixel_size_nm is None else round(float(prepared.pixel_size_nm), 4),
            "auto_width_px": None if auto is None or auto.object_width_px is None else round(auto.object_width_px, 2),
            "auto_confidence": None if auto is None or auto.confidence is None else round(auto.confidence, 4),
            "auto_scale_limited": bool(auto and auto.limited),
            "invalid_pixels": int(prepared.invalid.total),
            **{f"invalid_{kind}": int(n) for kind, n in prepared.invalid.to_dict().items()}}
