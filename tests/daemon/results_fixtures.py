"""FrameResults for the store, publication and results-CLI tests, made by nanoseg's own functions.

Wires are filled rotated rectangles of known length and width (the oracle for the statistics).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.draw import polygon

from nanoseg.instances import Instances, mask_boxes
from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg_daemon.contracts import FrameResult

SHAPE = (64, 96)
# (centre x, centre y, length, width, angle deg CCW from x, y down) in px
WIRES = ((30.0, 20.0, 40.0, 6.0, 0.0), (60.0, 40.0, 36.0, 8.0, 90.0), (50.0, 30.0, 30.0, 5.0, 45.0))


def wire_mask(cx: float, cy: float, length: float, width: float, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    ux, uy = math.cos(a), -math.sin(a)  # along the wire; y down on screen
    vx, vy = -uy, ux
    corners = [
        (cx + su * length / 2 * ux + sv * width / 2 * vx, cy + su * length / 2 * uy + sv * width / 2 * vy)
        for su, sv in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]
    # polygon() takes vertex coordinates of pixel centres; pixel (c, r) has its centre at c + 0.5
    rr, cc = polygon([y - 0.5 for _, y in corners], [x - 0.5 for x, _ in corners], SHAPE)
    mask = np.zeros(SHAPE, bool)
    mask[rr, cc] = True
    return mask


def frame_result(
    run_uid: str, seq_num: int, n_wires: int = 3, pixel_size_nm: float | None = 5.0
) -> FrameResult:
    """Frame ``seq_num`` of ``run_uid`` with the first ``n_wires`` of WIRES (0 = an empty frame)."""
    masks = np.stack([wire_mask(*w) for w in WIRES[:n_wires]]) if n_wires else np.zeros((0, *SHAPE), bool)
    scores = np.linspace(0.95, 0.75, n_wires, dtype=np.float32)
    instances = Instances(mask_boxes(masks), scores, masks)
    table = particle_table(masks, pixel_size_nm=pixel_size_nm)
    return FrameResult(
        run_uid=run_uid,
        frame_uid=f"{run_uid}-ev{seq_num}",
        seq_num=seq_num,
        timestamp=1_700_000_000.0 + seq_num,
        instances=instances,
        table=table,
        summary=frame_summary(table),
        model_version="test-model-1",
        invalid_pixels={"nan": 0, "saturated": seq_num},
        timings={"prepare": 0.001, "infer": 0.02, "postprocess": 0.002, "stats": 0.003},
        metadata={"pixel_size_nm": pixel_size_nm, "profile": "ptychography", "sample": "V2O5"},
    )
