"""Models: the volumetric Sam3D (3D SAM encoder, visual-sampler prompts, MLA decoder)."""

from sam3d.models.sam3d import (
    Sam3D,
    Sam3DFeatures,
    build_sam3d,
    count_parameters,
    load_sam3d_checkpoint,
    save_sam3d_checkpoint,
)

__all__ = [
    "Sam3D",
    "Sam3DFeatures",
    "build_sam3d",
    "count_parameters",
    "load_sam3d_checkpoint",
    "save_sam3d_checkpoint",
]
