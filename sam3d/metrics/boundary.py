"""Boundary F1 score (BFScore), tolerance in pixels (``tolerance_px``) or mm (``tolerance_mm``).

The boundary of a mask is the mask minus its erosion by the full 3x3 (3D: 3x3x3)
neighbourhood, with the outside of the image counted as background (so a mask that
touches the image border has boundary there). A boundary point of one mask is
matched when a boundary point of the other lies within the tolerance (Euclidean:
in index units for ``tolerance_px``, in mm with ``spacing_mm`` for ``tolerance_mm``;
exact, via the tolerance ellipsoid of :mod:`sam3d.metrics.surface`). Precision =
matched fraction of the predicted boundary, recall = matched fraction of the
reference boundary, BF = 2PR / (P + R).

Conventions: both masks empty -> NaN; exactly one empty -> 0. Misuse (both
tolerances, ``tolerance_mm`` without ``spacing_mm``, a negative or non-finite
tolerance, shapes that differ) raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics.utils import ignore_background
from monai.utils import MetricReduction

from sam3d.metrics.base import CaseMetric
from sam3d.metrics.surface import _within_tolerance, as_binary, check_tolerance

__all__ = ["BoundaryF1Metric", "compute_bf_score", "mask_boundary"]


def mask_boundary(mask: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``mask xor erosion(mask)`` for ``N x spatial`` bool masks (outside = background)."""
    pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d
    m = mask.float().unsqueeze(1)
    eroded = -pool(-F.pad(m, [1, 1] * spatial_dims, value=0.0), 3, stride=1)
    return mask & ~(eroded.squeeze(1) > 0.5)


def _tolerance_and_spacing(
    tolerance_px: float | None,
    tolerance_mm: float | None,
    spacing_mm: Sequence[float] | None,
    d: int,
) -> tuple[float, torch.Tensor]:
    """(tolerance, per-axis step) for the distance test; checks the unit choice is unambiguous."""
    if tolerance_px is not None and tolerance_mm is not None:
        raise ValueError("give tolerance_px or tolerance_mm, not both.")
    if tolerance_mm is not None:
        if spacing_mm is None:
            raise ValueError("tolerance_mm needs spacing_mm (the pixel spacing in mm).")
        step = torch.as_tensor(spacing_mm, dtype=torch.float64).flatten()
        if step.numel() == 1:
            step = step.expand(d)
        if step.numel() != d or not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
            raise ValueError(f"spacing_mm must be {d} positive finite values, got {step.tolist()}.")
        return float(check_tolerance(tolerance_mm, "tolerance_mm")), step
    if spacing_mm is not None:
        raise ValueError("spacing_mm is only used with tolerance_mm; tolerance_px is in pixels.")
    tol = 1.0 if tolerance_px is None else tolerance_px
    return float(check_tolerance(tol, "tolerance_px")), torch.ones(d, dtype=torch.float64)


def compute_bf_score(
    pred: torch.Tensor,
    gt: torch.Tensor,
    tolerance_px: float | None = None,
    *,
    tolerance_mm: float | None = None,
    spacing_mm: float | Sequence[float] | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Boundary F1 of binary masks ``... x spatial``, float64 ``...``.

    Args:
        tolerance_px: match distance in pixels (voxels), Euclidean in index space;
            default 1 when neither tolerance is given.
        tolerance_mm: match distance in mm instead; needs ``spacing_mm``.
        spacing_mm: pixel spacing in mm (``d`` values or one), only with ``tolerance_mm``.
        spatial_dims: 2 or 3; default ``pred.ndim`` (give it for batched input).
    """
    d = spatial_dims or pred.ndim
    if d not in (2, 3) or pred.ndim < d:
        raise ValueError(f"Only 2D and 3D masks are supported, got shape {tuple(pred.shape)}.")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}.")
    tolerance, step = _tolerance_and_spacing(tolerance_px, tolerance_mm, spacing_mm, d)
    lead = pred.shape[: pred.ndim - d]
    spatial = pred.shape[pred.ndim - d :]
    p = as_binary(pred, "pred").reshape(-1, *spatial)
    g = as_binary(gt, "gt").reshape(-1, *spatial)
    n, dev = p.shape[0], p.device
    s = step.expand(n, d).to(dev)
    tol = torch.full((n,), tolerance, dtype=torch.float64, device=dev)
    bp, bg = mask_boundary(p, d), mask_boundary(g, d)
    matched = []
    for src, dst in ((bp, bg), (bg, bp)):
        idx = torch.nonzero(src)
        hit = _within_tolerance(dst, idx, s, tol)
        count = torch.zeros(n, dtype=torch.float64, device=dev)
        count.index_add_(0, idx[:, 0], hit.double())
        matched.append(count)
    n_p = bp.flatten(1).sum(1).double()
    n_g = bg.flatten(1).sum(1).double()
    precision, recall = matched[0] / n_p, matched[1] / n_g
    bf = 2 * precision * recall / (precision + recall)
    bf = torch.where((precision + recall) == 0, torch.zeros_like(bf), bf)
    bf = torch.where((n_p == 0) ^ (n_g == 0), torch.zeros_like(bf), bf)
    bf = torch.where((n_p == 0) & (n_g == 0), torch.full_like(bf, float("nan")), bf)
    return bf.reshape(lead)


class BoundaryF1Metric(CaseMetric):
    """Cumulative BFScore, ``B x C`` per call, for ``B x C x spatial`` binarised inputs.

    Args:
        tolerance_px: match distance in pixels; default 1 when neither tolerance is given.
        tolerance_mm: match distance in mm instead; needs ``spacing_mm``.
        spacing_mm: pixel spacing in mm, only with ``tolerance_mm``.
    """

    def __init__(
        self,
        tolerance_px: float | None = None,
        tolerance_mm: float | None = None,
        spacing_mm: Sequence[float] | None = None,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        d = 2 if spacing_mm is None or np.ndim(spacing_mm) == 0 else len(spacing_mm)
        _tolerance_and_spacing(tolerance_px, tolerance_mm, spacing_mm, d)  # refuse misuse early
        self.tolerance_px = tolerance_px
        self.tolerance_mm = tolerance_mm
        self.spacing_mm = spacing_mm

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        return compute_bf_score(
            y_pred,
            y,
            self.tolerance_px,
            tolerance_mm=self.tolerance_mm,
            spacing_mm=self.spacing_mm,
            spatial_dims=y_pred.ndim - 2,
        ).float()
