"""clDice (centreline Dice) with a real, topology-preserving skeleton, on any device.

``Tprec = |S(pred) & gt| / |S(pred)|``, ``Tsens = |S(gt) & pred| / |S(gt)|`` and
``clDice = 2 Tprec Tsens / (Tprec + Tsens)``, with ``S`` the skeleton of
:func:`sam3d.metrics.skeleton.skeletonize` (the reference uses scikit-image's).

Conventions: both masks empty -> NaN; exactly one empty -> 0; ``Tprec + Tsens = 0``
-> 0.

``skeleton="skimage"`` uses scikit-image's ``skeletonize`` instead (CPU, one item at a
time; scikit-image must be installed): the skeleton of the clDice papers' code, for
numbers comparable with theirs. The two differ on thin, noisy masks (up to 0.09,
docs/METRICS.md says where and why).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics.utils import ignore_background
from monai.utils import MetricReduction

from sam3d.metrics.base import CaseMetric
from sam3d.metrics.skeleton import skeletonize
from sam3d.metrics.surface import as_binary

__all__ = ["ClDiceMetric", "cldice_from_skeletons", "compute_cldice"]


def cldice_from_skeletons(
    pred: torch.Tensor, gt: torch.Tensor, skel_pred: torch.Tensor, skel_gt: torch.Tensor, d: int
) -> torch.Tensor:
    """clDice from masks and their skeletons, all ``... x spatial`` bool; returns ``...``."""
    dims = tuple(range(pred.ndim - d, pred.ndim))
    sp, sg = skel_pred.sum(dims).double(), skel_gt.sum(dims).double()
    tprec = (skel_pred & gt).sum(dims).double() / sp
    tsens = (skel_gt & pred).sum(dims).double() / sg
    score = 2 * tprec * tsens / (tprec + tsens)
    p_empty, g_empty = ~pred.flatten(-d).any(-1), ~gt.flatten(-d).any(-1)
    score = torch.where(p_empty ^ g_empty, torch.zeros_like(score), score)
    score = torch.where(
        ~p_empty & ~g_empty & ((tprec + tsens) == 0), torch.zeros_like(score), score
    )
    return torch.where(p_empty & g_empty, torch.full_like(score, float("nan")), score)


SKELETONS = ("sam3d", "skimage")


def _skimage_skeletons(x: torch.Tensor, d: int) -> torch.Tensor:
    """scikit-image's skeletons of ``... x spatial`` bool masks (Zhang-Suen 2D, Lee 3D)."""
    try:
        from skimage.morphology import skeletonize as sk_skeletonize
    except ImportError as e:  # an optional (test) dependency
        raise ImportError('skeleton="skimage" needs scikit-image (pip install scikit-image)') from e
    flat = x.detach().cpu().numpy().reshape(-1, *x.shape[x.ndim - d :])
    out = [sk_skeletonize(m) > 0 if m.any() else m for m in flat]
    return torch.as_tensor(np.stack(out)).reshape(x.shape).to(x.device)


def compute_cldice(
    pred: torch.Tensor,
    gt: torch.Tensor,
    spatial_dims: int | None = None,
    skeleton: str = "sam3d",
) -> torch.Tensor:
    """clDice of binary masks ``spatial`` or ``... x spatial`` (2D or 3D), float64 ``...``.

    Args:
        pred, gt: bool or 0/1 tensors of one shape, on any device.
        spatial_dims: 2 or 3; default ``pred.ndim`` (give it for batched input).
        skeleton: "sam3d" (:func:`~sam3d.metrics.skeleton.skeletonize`, any device) or
            "skimage" (scikit-image's, on the CPU: the reference's numbers).
    """
    if skeleton not in SKELETONS:
        raise ValueError(f"skeleton must be one of {SKELETONS}, got {skeleton!r}.")
    d = spatial_dims or pred.ndim
    if d not in (2, 3) or pred.ndim < d:
        raise ValueError(f"clDice needs 2D or 3D masks, got shape {tuple(pred.shape)}.")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}.")
    p, g = as_binary(pred, "pred"), as_binary(gt, "gt")
    pair = torch.stack([p, g])
    # one thinning run for both masks
    skel = skeletonize(pair, d) if skeleton == "sam3d" else _skimage_skeletons(pair, d)
    return cldice_from_skeletons(p, g, skel[0], skel[1], d)


class ClDiceMetric(CaseMetric):
    """Cumulative clDice, ``B x C`` per call, for ``B x C x spatial`` binarised inputs.

    Args:
        include_background: keep channel 0 when there are several channels.
        reduction, get_not_nans: as in MONAI's metrics (NaN cases are skipped).
        skeleton: "sam3d" or "skimage" (see :func:`compute_cldice`).
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        skeleton: str = "sam3d",
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        if skeleton not in SKELETONS:
            raise ValueError(f"skeleton must be one of {SKELETONS}, got {skeleton!r}.")
        self.skeleton = skeleton

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        return compute_cldice(
            y_pred, y, spatial_dims=y_pred.ndim - 2, skeleton=self.skeleton
        ).float()
