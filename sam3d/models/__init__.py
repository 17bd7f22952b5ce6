"""Models over a shared SAM core (:mod:`sam3d.models.sam`): the volumetric wing
(:mod:`sam3d.models.volumetric`, Sam3D) and the planar wing (:mod:`sam3d.models.planar`,
TopoLoRA-SAM and the other 2D adaptations). Kinds are listed in :mod:`.registry`;
every trained checkpoint is read by :func:`sam3d.models.checkpoint.load_trained`.

Names are resolved lazily, so importing this package loads neither wing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Sam3D": "sam3d.models.volumetric.sam3d",
    "Sam3DFeatures": "sam3d.models.volumetric.sam3d",
    "build_sam3d": "sam3d.models.volumetric.sam3d",
    "count_parameters": "sam3d.models.volumetric.sam3d",
    "load_sam3d_checkpoint": "sam3d.models.volumetric.sam3d",
    "save_sam3d_checkpoint": "sam3d.models.volumetric.sam3d",
    "TopoLoRASam": "sam3d.models.planar.topolora",
    "build_topolora_sam": "sam3d.models.planar.topolora",
    "Samus": "sam3d.models.planar.samus",
    "build_samus": "sam3d.models.planar.samus",
    "build_sam": "sam3d.models.sam.build",
    "build_model": "sam3d.models.registry",
    "model_kinds": "sam3d.models.registry",
    "load_trained": "sam3d.models.checkpoint",
    "save_trained": "sam3d.models.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sam3d.models' has no attribute {name!r}")
