"""From a NIfTI file to the model's grid and back.

The model works on the *grid*: the image reoriented to RAS and resampled to 1 mm,
intensities windowed and z-scored exactly as in training. Clicks arrive as voxel
indices (i, j, k) of the original image or as world millimetres (RAS) and are mapped
through the affines: ``world = A_orig @ [i, j, k, 1]``, ``grid = inv(A_grid) @ world``.
A probability map on the grid goes back to the original voxel grid through MONAI's
:class:`~monai.transforms.Invertd` (the inverse of the recorded Orientationd and
Spacingd) and is saved with the input's own header, so affine, shape and orientation
are exactly the input's.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, MapTransform

from sam3d.data.io import atomic_write, check_grid_size, load_image
from sam3d.errors import Sam3DError

DEFAULT_SPACING_MM = 1.0


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


def preprocessing(
    dataset: Mapping[str, Any],
    spacing_mm: float | Sequence[float] | None = None,
    device: str | torch.device | None = None,
    key: str = "image",
) -> Compose:
    """The inference transform chain, load -> device -> RAS -> grid spacing -> intensity:
    :func:`sam3d.data.pipelines.inference_transforms` (the one recipe, as in training).

    Args:
        dataset: dataset preset (``window_hu``, ``mean``, ``std``, ``spacing_mm``).
        spacing_mm: grid spacing; default the preset's.
        device: where the volume is resampled (the GPU makes resampling cheap).
        key: the image key.
    """
    from sam3d.data.pipelines import inference_transforms

    return inference_transforms(dict(dataset), spacing_mm=spacing_mm, device=device, key=key)


def _as_affine(a: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(a).detach().cpu().double().numpy(), dtype=np.float64)


def original_to_grid(
    points: np.ndarray | Sequence[Sequence[float]],
    original_affine: Any,
    grid_affine: Any,
    world: bool = False,
) -> np.ndarray:
    """Map clicks ``N x 3`` (original voxels, or RAS mm with ``world``) to grid voxels ``N x 3``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    hom = np.concatenate([p, np.ones((len(p), 1))], axis=1)
    world_mm = hom if world else hom @ _as_affine(original_affine).T
    return (world_mm @ np.linalg.inv(_as_affine(grid_affine)).T)[:, :3]


def grid_spacing_mm(image: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm, 3 values) from a MetaTensor's affine; 1 mm for a plain tensor."""
    if not isinstance(image, MetaTensor):
        return (DEFAULT_SPACING_MM,) * 3
    a = _as_affine(image.affine)
    a = a[0] if a.ndim == 3 else a  # a batch of one
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))  # type: ignore[return-value]


def world_to_original(points_world: np.ndarray, original_affine: Any) -> np.ndarray:
    """RAS mm ``N x 3`` -> original voxel coordinates ``N x 3``."""
    p = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    hom = np.concatenate([p, np.ones((len(p), 1))], axis=1)
    return (hom @ np.linalg.inv(_as_affine(original_affine)).T)[:, :3]


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


def invert_to_original(
    prob_grid: torch.Tensor, image: MetaTensor, transform: Compose, nearest: bool = False
) -> torch.Tensor:
    """Resample a grid map ``H x W x D`` back to the original voxel grid ``I x J x K``.

    ``image`` is the preprocessed image whose ``applied_operations`` record the
    reorientation and resampling; ``transform`` the chain that produced it. A
    probability map is inverted with linear interpolation (``nearest=False``) and
    thresholded afterwards, which keeps lesion borders smooth at the original spacing.
    """
    pred = MetaTensor(prob_grid[None].float(), meta=dict(image.meta))
    pred.applied_operations = list(image.applied_operations)
    inv = Invertd(
        keys="pred", transform=transform, orig_keys="image", nearest_interp=nearest, to_tensor=True
    )
    out = inv({"pred": pred, "image": image})["pred"]
    return out[0].as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)[0]


def invert_region_to_original(
    prob_grid: torch.Tensor,
    grid_affine: Any,
    original_affine: Any,
    original_shape: Sequence[int],
    grid_lo: Sequence[int],
    grid_hi: Sequence[int],
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """Resample only the region ``grid_lo:grid_hi`` of a grid map back to the original grid.

    The same resampling as :func:`invert_to_original` (bilinear, ``align_corners=False``,
    border padding at the grid's edges), for maps that are zero outside the region (the
    decoded windows): a further click then costs the region, not the whole volume.

    Args:
        prob_grid: ``H x W x D`` map on the grid, zero outside ``grid_lo:grid_hi``.
        grid_affine / original_affine: voxel -> RAS mm of the grid and of the original image.
        original_shape: ``(I, J, K)``.
        grid_lo, grid_hi: the region in grid voxels (half-open).

    Returns:
        ``(crop, lo, hi)``: the map on original voxels ``lo:hi`` (half-open); zero elsewhere.
    """
    from monai.transforms import SpatialResample

    shape = prob_grid.shape
    # one voxel of the zeros around the region, except where the region meets the grid's
    # edge: there "border" padding repeats the edge as the full inversion does
    glo = [max(0, int(v) - 1) for v in grid_lo]
    ghi = [min(int(n), int(v) + 1) for v, n in zip(grid_hi, shape)]
    if any(h <= lo_ for lo_, h in zip(glo, ghi)):
        return torch.zeros(0, 0, 0, device=prob_grid.device), (0, 0, 0), (0, 0, 0)
    a_grid, a_orig = _as_affine(grid_affine), _as_affine(original_affine)
    corners = np.array(
        [
            [glo[0] if a else ghi[0] - 1, glo[1] if b else ghi[1] - 1, glo[2] if c else ghi[2] - 1]
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ],
        dtype=np.float64,
    )
    vox = world_to_original(np.concatenate([corners, np.ones((8, 1))], 1) @ a_grid.T[:, :3], a_orig)
    lo = tuple(int(max(0, np.floor(vox[:, a].min()) - 1)) for a in range(3))
    hi = tuple(int(min(original_shape[a], np.ceil(vox[:, a].max()) + 2)) for a in range(3))
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return torch.zeros(0, 0, 0, device=prob_grid.device), (0, 0, 0), (0, 0, 0)
    shift = np.eye(4)
    shift[:3, 3] = glo
    crop = prob_grid[glo[0] : ghi[0], glo[1] : ghi[1], glo[2] : ghi[2]].float()
    src = MetaTensor(crop[None], affine=torch.as_tensor(a_grid @ shift))
    dst = np.eye(4)
    dst[:3, 3] = lo
    out = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False)(
        src,
        dst_affine=torch.as_tensor(a_orig @ dst),
        spatial_size=tuple(h - lo_ for lo_, h in zip(lo, hi)),
    )
    return torch.as_tensor(out)[0], lo, hi


def save_mask(
    mask: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    reference: str | os.PathLike | np.ndarray | torch.Tensor,
) -> Path:
    """Write a uint8 mask ``I x J x K`` as NIfTI, atomically, with the reference's geometry.

    ``reference`` is the input image's path (its header -- affine, qform/sform codes,
    zooms -- is copied) or a 4 x 4 affine.
    """
    path = Path(path)
    arr = np.asarray(torch.as_tensor(mask).detach().cpu().numpy(), dtype=np.uint8)
    if isinstance(reference, (str, os.PathLike)):
        ref = nib.load(str(reference))
        if tuple(ref.shape[:3]) != arr.shape:
            raise Sam3DError(f"mask shape {arr.shape} differs from the image's {ref.shape[:3]}")
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        img = nib.Nifti1Image(arr, ref.affine, header=header)
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img = nib.Nifti1Image(arr, _as_affine(reference))
        img.set_data_dtype(np.uint8)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
