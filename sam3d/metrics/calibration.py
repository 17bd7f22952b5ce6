"""Expected calibration error (ECE) of per-pixel probabilities, 15 equal-width bins.

``mode="confidence"`` (Guo et al. 2017, the usual ECE): confidence ``max(p, 1 - p)``
against accuracy of the thresholded prediction. ``mode="probability"``: the
foreground probability ``p`` against the foreground frequency (reliability of ``p``).
Bin ``b`` holds values in ``(b/15, (b+1)/15]`` (0 goes to the first bin);
``ECE = sum_b |B_b| / N * |mean(confidence) - mean(accuracy)|``.
"""

from __future__ import annotations

from typing import Any

import torch

from sam3d.metrics.base import CaseMetric

__all__ = ["CalibrationErrorMetric", "calibration_bins", "compute_ece", "ece_from_bins"]


def calibration_bins(
    prob: torch.Tensor, target: torch.Tensor, n_bins: int = 15, mode: str = "confidence"
) -> torch.Tensor:
    """Per-bin (count, sum of confidence, sum of accuracy): ``3 x n_bins`` float64."""
    p = prob.detach().double().flatten()
    y = (target > 0.5 if target.dtype != torch.bool else target).flatten()
    if p.shape != y.shape:
        raise ValueError(f"prob and target sizes differ: {prob.numel()} vs {target.numel()}.")
    if mode == "confidence":
        conf = torch.maximum(p, 1 - p)
        acc = ((p > 0.5) == y).double()
    elif mode == "probability":
        conf, acc = p, y.double()
    else:
        raise ValueError(f"Unknown ECE mode {mode!r}; use 'confidence' or 'probability'.")
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=p.device)
    out[0].index_add_(0, idx, torch.ones_like(conf))
    out[1].index_add_(0, idx, conf)
    out[2].index_add_(0, idx, acc)
    return out


def ece_from_bins(bins: torch.Tensor) -> torch.Tensor:
    """ECE from ``3 x n_bins`` (or summed) bin statistics."""
    count, conf, acc = bins
    total = count.sum()
    gap = (conf - acc).abs()  # = count * |mean conf - mean acc|
    return gap.sum() / total


def compute_ece(
    prob: torch.Tensor, target: torch.Tensor, n_bins: int = 15, mode: str = "confidence"
) -> torch.Tensor:
    """ECE of probabilities ``prob`` (any shape, in [0, 1]) against binary ``target``."""
    return ece_from_bins(calibration_bins(prob, target, n_bins, mode))


class CalibrationErrorMetric(CaseMetric):
    """Dataset-level ECE: bin statistics of every case are summed, then one ECE.

    ``y_pred`` are foreground probabilities ``B x 1 x spatial`` (or ``B x C``: the
    channel ``channel`` is used), ``y`` the binary reference of the same layout.
    """

    def __init__(self, n_bins: int = 15, mode: str = "confidence", channel: int = -1) -> None:
        super().__init__(include_background=True)
        self.n_bins = n_bins
        self.mode = mode
        self.channel = channel

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        p, t = y_pred[:, self.channel], y[:, self.channel]
        return torch.stack(
            [calibration_bins(p[i], t[i], self.n_bins, self.mode) for i in range(p.shape[0])]
        )  # B x 3 x n_bins

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """One dataset-level ECE from the summed bin statistics (not a per-case mean)."""
        return ece_from_bins(self.buffer().sum(0)).float()
