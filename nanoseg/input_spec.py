"""What the model was trained on: image kind, pixel scale and gray mapping (stored with a checkpoint).

Inference prepares every frame from this record, so training and inference cannot disagree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nanoseg.config_io import StrictModel

FrameMode = Literal["optical_density", "intensity"]
"""``optical_density``: transmission converted to OD = -ln(I / I0). ``intensity``: used as is (SEM)."""


class InputSpec(StrictModel):
    """The model's input contract.

    - ``mode``: the kind of image the model was trained on.
    - ``pixel_size_nm``: physical size of one training pixel, nm; frames are resampled to it.
    - ``intensity_mapping``: how an optical-density image becomes the 0–255 gray the model saw.
      ``image_max``: each image's maximum -> 255 (the generator's paper preset, ``normalisation:
      image_max``). ``fixed``: the OD value ``od_max`` -> 255 (the generator's ``domain_height``
      normalisation: ``od_max = domain.height * od_per_voxel``). Values below 0 clip to 0 and above
      255 clip to 255, as in the generator.
    - ``size``: side of the square model input, px; larger frames are tiled, smaller ones padded.
    """

    mode: FrameMode = "optical_density"
    pixel_size_nm: float = Field(gt=0)
    intensity_mapping: Literal["image_max", "fixed"] = "image_max"
    od_max: float | None = Field(None, gt=0)
    size: int = Field(512, ge=32, le=8192)

    @model_validator(mode="after")
    def _mapping_complete(self) -> InputSpec:
        if self.intensity_mapping == "fixed" and self.od_max is None:
            raise ValueError("od_max is required when intensity_mapping is 'fixed'")
        if self.intensity_mapping == "image_max" and self.od_max is not None:
            raise ValueError("od_max is only used when intensity_mapping is 'fixed'")
        return self
