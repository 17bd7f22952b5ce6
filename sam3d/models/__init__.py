"""Models: the volumetric Sam3D (3D SAM encoder, visual-sampler prompts, MLA decoder) and
the planar TopoLoRA-SAM (LoRA + spatial adapter around segment_anything's Sam)."""

from sam3d.models.sam3d import (
    Sam3D,
    Sam3DFeatures,
    build_sam3d,
    count_parameters,
    load_sam3d_checkpoint,
    save_sam3d_checkpoint,
)
from sam3d.models.topolora import TopoLoRASam, build_topolora_sam

__all__ = [
    "Sam3D",
    "Sam3DFeatures",
    "TopoLoRASam",
    "build_sam3d",
    "build_topolora_sam",
    "count_parameters",
    "load_sam3d_checkpoint",
    "save_sam3d_checkpoint",
]
