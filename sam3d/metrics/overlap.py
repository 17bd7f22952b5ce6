"""Overlap metrics: Dice, IoU, precision and recall, per case or pooled over a dataset.

All take bool / 0-1 masks ``... x spatial`` (the last ``spatial_dims`` dims are
spatial, the rest a batch) on any device and return float64 ``...``.
Conventions (as DeepMind's ``compute_dice_coefficient``): Dice and IoU of two empty
masks are NaN; precision is NaN for an empty prediction, recall for an empty
reference.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics.utils import ignore_background
from monai.utils import MetricReduction

from sam3d.metrics.base import CaseMetric
from sam3d.metrics.surface import as_binary

__all__ = [
    "OverlapMetric",
    "compute_dice",
    "compute_iou",
    "compute_precision_recall",
    "confusion_counts",
    "overlap_from_counts",
]

METRICS = ("dice", "iou", "precision", "recall")


def confusion_counts(pred: torch.Tensor, gt: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """True positives, false positives, false negatives: ``... x 3`` float64."""
    p, g = as_binary(pred, "pred"), as_binary(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}.")
    p, g = p.flatten(-spatial_dims), g.flatten(-spatial_dims)
    tp = (p & g).sum(-1)
    return torch.stack([tp, p.sum(-1) - tp, g.sum(-1) - tp], -1).double()


def overlap_from_counts(counts: torch.Tensor, metric: str) -> torch.Tensor:
    """Dice / IoU / precision / recall from ``... x 3`` (tp, fp, fn) counts."""
    tp, fp, fn = counts.unbind(-1)
    if metric == "dice":
        return 2 * tp / (2 * tp + fp + fn)
    if metric == "iou":
        return tp / (tp + fp + fn)
    if metric == "precision":
        return tp / (tp + fp)
    if metric == "recall":
        return tp / (tp + fn)
    raise ValueError(f"Unknown overlap metric {metric!r}; use one of {', '.join(METRICS)}.")


def _spatial(pred: torch.Tensor, spatial_dims: int | None) -> int:
    return spatial_dims or min(pred.ndim, 3)


def compute_dice(
    pred: torch.Tensor, gt: torch.Tensor, spatial_dims: int | None = None
) -> torch.Tensor:
    """Dice ``2|P&G| / (|P|+|G|)``; NaN when both are empty.

    ``spatial_dims`` defaults to ``pred.ndim`` (at most 3); give it for batched input.
    """
    return overlap_from_counts(confusion_counts(pred, gt, _spatial(pred, spatial_dims)), "dice")


def compute_iou(
    pred: torch.Tensor, gt: torch.Tensor, spatial_dims: int | None = None
) -> torch.Tensor:
    """IoU ``|P&G| / |P|G|``; NaN when both are empty."""
    return overlap_from_counts(confusion_counts(pred, gt, _spatial(pred, spatial_dims)), "iou")


def compute_precision_recall(
    pred: torch.Tensor, gt: torch.Tensor, spatial_dims: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(precision, recall); NaN for an empty prediction / an empty reference."""
    counts = confusion_counts(pred, gt, _spatial(pred, spatial_dims))
    return overlap_from_counts(counts, "precision"), overlap_from_counts(counts, "recall")


class OverlapMetric(CaseMetric):
    """Cumulative Dice / IoU / precision / recall for ``B x C x spatial`` binarised inputs.

    The buffer keeps per-case (tp, fp, fn) counts, so ``aggregate`` can give the mean of
    per-case values (``pooled=False``, NaN cases skipped) or the dataset-level value from
    the summed counts (``pooled=True``; TopoLoRA-SAM reports Dice/IoU this way).

    Args:
        metric: "dice", "iou", "precision" or "recall".
        include_background: keep channel 0 when there are several channels.
        pooled: dataset-level aggregation (one value per class, then their mean).
        reduction, get_not_nans: as MONAI's metrics, for per-case aggregation.
    """

    def __init__(
        self,
        metric: str = "dice",
        include_background: bool = False,
        pooled: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        if metric not in METRICS:
            raise ValueError(f"Unknown overlap metric {metric!r}; use one of {', '.join(METRICS)}.")
        self.metric = metric
        self.pooled = pooled

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        return confusion_counts(y_pred, y, y_pred.ndim - 2)  # B x C x 3

    def case_values(self) -> torch.Tensor:
        """Per-case values ``N x C`` from the buffered counts."""
        return overlap_from_counts(self.buffer(), self.metric).float()

    def aggregate(self, reduction: MetricReduction | str | None = None) -> Any:
        if self.pooled:
            per_class = overlap_from_counts(self.buffer().sum(0), self.metric)
            return per_class.nanmean().float()
        return super().aggregate(reduction)


class CaseOverlapMetric(CaseMetric):
    """Per-case Dice / IoU / precision / recall in the buffer (``B x C``), so MONAI's
    ``save_details`` records the values of each case (not :class:`OverlapMetric`'s counts).

    Args: ``metric``, ``include_background``, ``reduction``, ``get_not_nans`` as
    :class:`OverlapMetric`.
    """

    def __init__(
        self,
        metric: str = "dice",
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        if metric not in METRICS:
            raise ValueError(f"Unknown overlap metric {metric!r}; use one of {', '.join(METRICS)}.")
        self.metric = metric

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        counts = confusion_counts(y_pred, y, y_pred.ndim - 2)
        return overlap_from_counts(counts, self.metric).float()
