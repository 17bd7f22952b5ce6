"""The prostate bundle's slice preprocessing, volume <-> slice stack.

Preprocessing follows the reference: per volume, intensities clipped at the 0.5 / 99.5
percentiles and scaled to 0..255 (uint8); each slice (along the volume's third voxel
axis) resized to the mask side ``s = S/4`` and then to SAM's input ``S`` as three equal
channels; labels resized to ``s`` (nearest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sam3d.data.io import load_image_label, nifti_stem

PREPROCESS = "percentile 0.5-99.5 -> uint8; slice -> s (bilinear) -> S (bilinear), 3 channels"


def volume_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Clip at the 0.5 / 99.5 percentiles and scale to 0..255 uint8 (the reference's)."""
    lo, hi = np.percentile(volume, (0.5, 99.5))
    scaled = (np.clip(volume, lo, hi) - lo) / max(float(hi - lo), 1e-8)
    return np.rint(scaled * 255).astype(np.uint8)


def slice_to_input(slice_u8: np.ndarray, input_size: int, mask_size: int) -> np.ndarray:
    """``H x W`` uint8 -> SAM input ``3 x S x S`` uint8 (resized to ``s`` then ``S``)."""
    x = torch.as_tensor(slice_u8, dtype=torch.float32)[None, None]
    x = F.interpolate(x, (mask_size, mask_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x, (input_size, input_size), mode="bilinear", align_corners=False)
    return x[0].clamp(0, 255).round().to(torch.uint8).expand(3, -1, -1).numpy()


def label_to_mask(label: np.ndarray, mask_size: int) -> np.ndarray:
    """``H x W`` label -> ``s x s`` uint8 0/1 (nearest)."""
    y = torch.as_tensor(label > 0, dtype=torch.float32)[None, None]
    y = F.interpolate(y, (mask_size, mask_size), mode="nearest")[0, 0]
    return (y > 0.5).numpy().astype(np.uint8)


def case_slices(
    case: dict[str, str], input_size: int, mask_size: int, gt_only: bool = True
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, input ``3 x S x S`` uint8, mask ``s x s`` uint8) of a case's slices; with
    ``gt_only`` only slices whose label has foreground (the reference's training set)."""
    image, label = load_image_label(case["image"], case["label"])
    vol = volume_to_uint8(image[0].numpy())
    lab = label[0].numpy()
    stem = nifti_stem(case["image"])
    out = []
    for k in range(vol.shape[2]):
        if gt_only and not (lab[:, :, k] > 0).any():
            continue
        out.append((f"{stem}/{k:04d}", slice_to_input(vol[:, :, k], input_size, mask_size),
                    label_to_mask(lab[:, :, k], mask_size)))  # fmt: skip
    return out


class CaseSlices:
    """Training / validation preprocessing: a case ``{"image", "label"}`` -> its slices
    ``[(key, input 3 x S x S uint8, mask s x s uint8)]`` (:func:`case_slices`)."""

    description = PREPROCESS  # part of the embedding cache's fingerprint

    def __init__(self, input_size: int, mask_size: int, gt_only: bool = True) -> None:
        self.input_size, self.mask_size, self.gt_only = int(input_size), int(mask_size), gt_only

    def __call__(self, case: dict[str, str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return case_slices(case, self.input_size, self.mask_size, self.gt_only)


def volume_slices(volume: np.ndarray, input_size: int, mask_size: int) -> np.ndarray:
    """``I x J x K`` intensities -> the SAM inputs of its K slices, ``K x 3 x S x S`` uint8."""
    vol = volume_to_uint8(np.asarray(volume, dtype=np.float32))
    return np.stack([slice_to_input(vol[:, :, k], input_size, mask_size)
                     for k in range(vol.shape[2])])  # fmt: skip


def masks_to_volume(masks: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Slice masks ``K x s x s`` -> uint8 volume ``I x J x K`` (each resized, nearest)."""
    m = F.interpolate(masks[:, None].float().cpu(), tuple(shape[:2]), mode="nearest")[:, 0]
    return np.ascontiguousarray((m > 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))
