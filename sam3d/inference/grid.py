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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

# moved to sam3d.data (the preprocessing recipe uses them; data never imports inference)
from sam3d.data.geometry import (  # noqa: F401
    DEFAULT_SPACING_MM,
    ClicksToGridd,
    _as_affine,
    check_points_inside,
    grid_spacing_mm,
    original_to_grid,
    world_to_original,
)
from sam3d.data.io import atomic_write
from sam3d.data.pipelines import inference_transforms
from sam3d.data.volume import LoadVolumed  # noqa: F401
from sam3d.errors import Sam3DError


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
    return inference_transforms(dict(dataset), spacing_mm=spacing_mm, device=device, key=key)


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
