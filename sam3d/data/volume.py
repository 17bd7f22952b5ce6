"""The first transform of the volumetric chain: a 3D image read and checked."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import MapTransform

from sam3d.data.io import check_grid_size, load_image
from sam3d.errors import Sam3DError


class LoadVolumed(MapTransform):
    """Load a 3D image (a path) with :func:`sam3d.data.io.load_image`; pass a MetaTensor through.

    The result is ``1 x I x J x K`` in the file's own orientation, with ``original_affine``
    and ``spatial_shape`` in its metadata. Unreadable, corrupt or non-3D files raise
    :class:`Sam3DError`; so does an image whose grid at ``grid_spacing_mm`` (the
    ``Spacingd`` that follows) would be too large (checked before it is allocated).
    """

    def __init__(
        self,
        keys: Any = "image",
        allow_missing_keys: bool = False,
        grid_spacing_mm: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.grid_spacing_mm = grid_spacing_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                img = load_image(value, require_3d=True)
            elif isinstance(value, MetaTensor):
                img = value
                if img.ndim != 4:
                    raise Sam3DError(
                        f"expected a channel-first 3D image (1 x I x J x K), got shape "
                        f"{tuple(img.shape)}"
                    )
            else:
                raise Sam3DError(f"cannot read an image from a {type(value).__name__}")
            if self.grid_spacing_mm is not None:
                name = img.meta.get("filename_or_obj") or "the image"
                check_grid_size(name, img.shape[1:], img.affine, self.grid_spacing_mm)
            img.meta.setdefault("original_affine", img.affine.clone())
            img.meta.setdefault("spatial_shape", np.asarray(img.shape[1:]))
            d[key] = img
        return d
