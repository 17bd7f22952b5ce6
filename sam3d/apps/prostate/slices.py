"""The prostate bundle's slice preprocessing, volume <-> slice stack.

Preprocessing follows the reference: per volume, intensities clipped at the 0.5 / 99.5
percentiles and scaled to 0..255 (uint8); each slice (along the volume's third voxel
axis) resized to the mask side ``s = S/4`` and then to SAM's input ``S`` as three equal
channels; labels resized to ``s`` (nearest). ``interpolation="bicubic"`` resizes each
slice to ``s`` as the reference's ``skimage.transform.resize(order=3, mode="constant",
anti_aliasing=True)`` does (cubic spline, clipped to the slice's range), truncated to
uint8 as its ``np.uint8``, then bilinearly to ``S`` (SAM's ``ResizeLongestSide``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sam3d.data.io import load_image_label, nifti_stem
from sam3d.errors import Sam3DError

PREPROCESS = "percentile 0.5-99.5 -> uint8; slice -> s (bilinear) -> S (bilinear), 3 channels"
INTERPOLATIONS = ("bilinear", "bicubic")


def volume_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Clip at the 0.5 / 99.5 percentiles and scale to 0..255 uint8 (the reference's)."""
    lo, hi = np.percentile(volume, (0.5, 99.5))
    scaled = (np.clip(volume, lo, hi) - lo) / max(float(hi - lo), 1e-8)
    return np.rint(scaled * 255).astype(np.uint8)


def cubic_resize(image: np.ndarray, size: int) -> np.ndarray:
    """``H x W`` -> float64 ``size x size`` by a cubic spline, zero outside, with
    scikit-image's anti-aliasing Gaussian when shrinking (``sigma = (factor - 1) / 2``)
    and its clipping to the input's range: ``skimage.transform.resize(order=3,
    mode="constant", anti_aliasing=True, preserve_range=True)`` in scipy."""
    from scipy import ndimage

    x = np.asarray(image, dtype=np.float64)
    factors = np.asarray(x.shape, dtype=np.float64) / float(size)
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    if np.any(sigma > 0):
        x = ndimage.gaussian_filter(x, sigma, mode="grid-constant", cval=0.0)
    out = ndimage.zoom(x, 1.0 / factors, order=3, mode="grid-constant", cval=0.0, grid_mode=True)
    lo, hi = float(np.min(image)), float(np.max(image))
    if not lo <= 0.0 <= hi and out.min() <= 0.0 <= out.max():  # the zero padding's value
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return np.clip(out, lo, hi)


def slice_to_input(
    slice_u8: np.ndarray, input_size: int, mask_size: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """``H x W`` uint8 -> SAM input ``3 x S x S`` uint8 (resized to ``s`` then ``S``;
    ``interpolation`` of the first step: ``"bilinear"`` or the reference's ``"bicubic"``)."""
    if interpolation not in INTERPOLATIONS:
        raise Sam3DError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation == "bicubic":
        y = np.floor(cubic_resize(slice_u8, mask_size))
        x = torch.as_tensor(y, dtype=torch.float32)[None, None]
    else:
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
    case: dict[str, str],
    input_size: int,
    mask_size: int,
    gt_only: bool = True,
    interpolation: str = "bilinear",
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
        x = slice_to_input(vol[:, :, k], input_size, mask_size, interpolation)
        out.append((f"{stem}/{k:04d}", x, label_to_mask(lab[:, :, k], mask_size)))
    return out


class CaseSlices:
    """Training / validation preprocessing: a case ``{"image", "label"}`` -> its slices
    ``[(key, input 3 x S x S uint8, mask s x s uint8)]`` (:func:`case_slices`)."""

    def __init__(
        self,
        input_size: int,
        mask_size: int,
        gt_only: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        self.input_size, self.mask_size, self.gt_only = int(input_size), int(mask_size), gt_only
        self.interpolation = interpolation
        # part of the embedding cache's fingerprint
        self.description = PREPROCESS.replace("(bilinear) -> S", f"({interpolation}) -> S")

    def __call__(self, case: dict[str, str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return case_slices(case, self.input_size, self.mask_size, self.gt_only, self.interpolation)


def volume_slices(
    volume: np.ndarray, input_size: int, mask_size: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """``I x J x K`` intensities -> the SAM inputs of its K slices, ``K x 3 x S x S`` uint8."""
    vol = volume_to_uint8(np.asarray(volume, dtype=np.float32))
    return np.stack([slice_to_input(vol[:, :, k], input_size, mask_size, interpolation)
                     for k in range(vol.shape[2])])  # fmt: skip


def masks_to_volume(masks: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Slice masks ``K x s x s`` -> uint8 volume ``I x J x K`` (each resized, nearest)."""
    m = F.interpolate(masks[:, None].float().cpu(), tuple(shape[:2]), mode="nearest")[:, 0]
    return np.ascontiguousarray((m > 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))
