"""Automatic-mask selection of DeSAM's grid mode, as segment_anything keeps its own in
``utils/amg.py``: the clean-up of small holes and islands and the choice of one mask
among a point grid's candidates.
"""

from __future__ import annotations

import numpy as np
import torch

from sam3d.errors import Sam3DError


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """SAM's AMG clean-up of one ``H x W`` bool mask (``segment_anything.utils.amg``, which
    needs OpenCV; scipy here): ``mode="holes"`` fills holes, ``"islands"`` drops islands,
    smaller than ``area_thresh`` px (8-connected). When every island is small, the largest
    is kept. Returns the mask and whether any region was below the threshold."""
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise Sam3DError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    labels, n = ndimage.label(mask != holes, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if not len(small):
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    big = np.setdiff1d(np.arange(1, n + 1), small)
    if not len(big):
        big = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, big), True


def select_grid_mask(
    logits: torch.Tensor,
    iou: torch.Tensor,
    iou_threshold: float = 0.5,
    min_region_px: float = 1000,
    nms_threshold: float = 0.7,
) -> tuple[torch.Tensor, float]:
    """One mask from grid candidates ``P x H x W`` logits and predicted IoU ``P``, as the
    reference's automatic mask generator with one crop and its top record kept.

    Candidates with IoU > ``iou_threshold`` are binarised (probability > 0.5); box NMS at
    ``nms_threshold`` ranked by IoU; holes, then islands, below ``min_region_px`` at a
    256 x 256 mask (scaled with ``H x W``) are cleaned (:func:`remove_small_regions`); a
    second box NMS prefers masks the clean-up left unchanged; the first survivor is kept.
    Returns it (bool ``H x W``) and its IoU, or an empty mask and NaN when none passed.
    """
    from segment_anything.utils.amg import batched_mask_to_box
    from torchvision.ops import batched_nms

    h, w = logits.shape[-2:]
    keep = torch.nonzero(iou > iou_threshold).flatten()
    if not len(keep):
        return torch.zeros(h, w, dtype=torch.bool), float("nan")
    masks, scores = logits[keep] > 0, iou[keep].float()
    zeros = torch.zeros(len(keep), dtype=torch.long)
    first = batched_nms(batched_mask_to_box(masks).float(), scores, zeros, nms_threshold)
    area = float(min_region_px) * h * w / 256**2
    if area <= 0:  # the reference cleans (and re-runs NMS) only with a minimum region
        return masks[first[0]], float(scores[first[0]])
    cleaned, unchanged = [], []
    for k in first.tolist():
        m, holes = remove_small_regions(masks[k].numpy(), area, "holes")
        m, islands = remove_small_regions(m, area, "islands")
        cleaned.append(torch.from_numpy(np.ascontiguousarray(m)))
        unchanged.append(float(not (holes or islands)))
    stack = torch.stack(cleaned)
    boxes = batched_mask_to_box(stack).float()
    top = int(batched_nms(boxes, torch.tensor(unchanged), zeros[: len(stack)], nms_threshold)[0])
    return stack[top], float(scores[first[top]])
