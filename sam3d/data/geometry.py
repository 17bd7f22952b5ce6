"""Coordinates between an image's own voxels, world millimetres (RAS) and the model's grid.

Clicks arrive as voxel indices (i, j, k) of the original image or as world millimetres
(RAS) and are mapped through the affines: ``world = A_orig @ [i, j, k, 1]``,
``grid = inv(A_grid) @ world``. Each step is MONAI's ``ApplyTransformToPoints`` (the array
form of ``ApplyTransformToPointsd``) in float64. The dictionary transform itself is not
used: it applies one affine, taken from a reference image's metadata, while a click
needs two (the original image's, then the grid's inverse), checked against the original
image's bounds with a one-line user error first (:class:`ClicksToGridd`); and a
``MetaTensor`` it returns carries its own affine into a second call, so the two steps
pass plain tensors.

Voxel spacing from an affine is MONAI's ``affine_to_spacing`` (:func:`spacing_from_affine`),
with zero sizes kept as zero (the readers refuse them).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import ApplyTransformToPoints, MapTransform

from sam3d.errors import Sam3DError

DEFAULT_SPACING_MM = 1.0


def _as_affine(a: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(a).detach().cpu().double().numpy(), dtype=np.float64)


_VOXEL_TO_WORLD = ApplyTransformToPoints(dtype=torch.float64, invert_affine=False)
_WORLD_TO_VOXEL = ApplyTransformToPoints(dtype=torch.float64, invert_affine=True)


def _apply(step: ApplyTransformToPoints, points: np.ndarray, affine: Any) -> np.ndarray:
    """One affine on ``N x 3`` points (MONAI's ``ApplyTransformToPoints``, float64)."""
    p = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(1, -1, 3))
    out = step(p, affine=torch.as_tensor(_as_affine(affine)))
    return torch.as_tensor(out).detach().cpu().numpy()[0]  # a plain array, no meta affine


def spacing_from_affine(affine: Any) -> tuple[float, ...]:
    """Voxel size in mm per index axis: the column norms of the affine's linear part
    (MONAI's ``affine_to_spacing``; a zero size stays zero)."""
    a = _as_affine(affine)
    return tuple(float(v) for v in affine_to_spacing(a, r=a.shape[-1] - 1, suppress_zeros=False))


def original_to_grid(
    points: np.ndarray | Sequence[Sequence[float]],
    original_affine: Any,
    grid_affine: Any,
    world: bool = False,
) -> np.ndarray:
    """Map clicks ``N x 3`` (original voxels, or RAS mm with ``world``) to grid voxels ``N x 3``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    world_mm = p if world else _apply(_VOXEL_TO_WORLD, p, original_affine)
    return _apply(_WORLD_TO_VOXEL, world_mm, grid_affine)


def grid_spacing_mm(image: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm, 3 values) from a MetaTensor's affine; 1 mm for a plain tensor."""
    if not isinstance(image, MetaTensor):
        return (DEFAULT_SPACING_MM,) * 3
    a = _as_affine(image.affine)
    a = a[0] if a.ndim == 3 else a  # a batch of one
    return spacing_from_affine(a)  # type: ignore[return-value]


def world_to_original(points_world: np.ndarray, original_affine: Any) -> np.ndarray:
    """RAS mm ``N x 3`` -> original voxel coordinates ``N x 3``."""
    return _apply(_WORLD_TO_VOXEL, points_world, original_affine)


def check_points_inside(
    points: np.ndarray | Sequence[Sequence[float]],
    original_affine: Any,
    shape: Sequence[int],
    world: bool = False,
) -> None:
    """Raise :class:`Sam3DError` unless every click lies inside the original image."""
    given = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    vox = world_to_original(given, original_affine) if world else given
    shape = [int(s) for s in shape]
    for g, v in zip(given, vox):
        if not all(-0.5 <= v[a] <= shape[a] - 0.5 for a in range(3)):
            what = "world point (mm, RAS)" if world else "voxel"
            where = f" (voxel {np.round(v, 1).tolist()})" if world else ""
            raise Sam3DError(
                f"click {what} {np.round(g, 2).tolist()}{where} is outside the image of shape "
                f"{tuple(shape)}; voxel indices run from 0 to {tuple(s - 1 for s in shape)}"
            )


class ClicksToGridd(MapTransform):
    """Map VISTA3D-style prompts in the data dict onto the grid of the preprocessed image.

    Reads ``points`` (``N x 3``, original voxel indices, or RAS mm with ``world``) and
    ``point_labels`` (``N``: 1 foreground, 0 background), checks they lie inside the
    image, and replaces them with grid voxel coordinates (float32 ``N x 3``) and long
    labels. Missing prompts become an empty set (``0 x 3``), meaning automatic mode.
    Place it after Spacingd.
    """

    def __init__(
        self,
        ref_key: str = "image",
        points_key: str = "points",
        labels_key: str = "point_labels",
        world: bool = False,
    ) -> None:
        super().__init__([points_key], allow_missing_keys=True)
        self.ref_key, self.points_key, self.labels_key, self.world = (
            ref_key,
            points_key,
            labels_key,
            world,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.ref_key]
        pts = d.get(self.points_key)
        pts = np.zeros((0, 3)) if pts is None else np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        labels = d.get(self.labels_key)
        labels = np.ones(len(pts)) if labels is None else np.asarray(labels).reshape(-1)
        if len(labels) != len(pts):
            raise Sam3DError(f"{len(pts)} points but {len(labels)} point_labels")
        a0 = img.meta["original_affine"]
        check_points_inside(pts, a0, img.meta["spatial_shape"], world=self.world)
        grid = original_to_grid(pts, a0, img.affine, world=self.world)
        d[self.points_key] = torch.as_tensor(grid, dtype=torch.float32)
        d[self.labels_key] = torch.as_tensor(labels, dtype=torch.long)
        return d
